"""Grafana dashboards as code: ``python -m stratoscope.dashboards`` writes deploy/grafana/dashboards/."""
