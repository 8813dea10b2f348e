"""Serving a finished run over HTTP with Ray Serve: what to serve, the app, the server, the client."""
