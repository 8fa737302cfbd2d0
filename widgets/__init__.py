"""Live notebook widgets for the engine: `display(Dashboard(engine))`, or `%llm dashboard`."""

from .dashboard import Dashboard, close_dashboards

__all__ = ["Dashboard", "close_dashboards"]
