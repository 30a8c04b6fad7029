"""Offline Ray Data jobs."""
