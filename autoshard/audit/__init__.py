"""Is the compiled program the priced plan? Reading compiled HLO (collectives with their
replica groups, cost and memory analyses) and comparing it with what a plan expects."""
