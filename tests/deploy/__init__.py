"""Deployment: the reverse proxy configurations of docs/deployment.md, run for real."""
