"""Serving a trained model: engines, dynamic batching, the HTTP server and its load test."""
