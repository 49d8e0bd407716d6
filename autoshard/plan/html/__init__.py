"""HTML view of a :class:`~autoshard.Plan` (see :mod:`.render`)."""
from .render import plan_html as plan_html
from .render import plan_page as plan_page
from .render import simulate_schedule as simulate_schedule
