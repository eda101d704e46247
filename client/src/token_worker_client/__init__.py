"""Typed producer client for the token worker's Celery task contract."""
