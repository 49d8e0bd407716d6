"""Inter-operator parallelism: the gradient markers, cutting the loss into layers and
stages, planning each stage on its sub-mesh, the stage DP, and assembling the runtime
pipeline."""
