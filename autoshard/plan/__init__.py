"""The :class:`~autoshard.plan.record.Plan` record and its views: text summary, JSON, HTML."""
