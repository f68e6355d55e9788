"""The HTTP plumbing every front end shares: auth, CSRF, sessions, common responses, middleware."""
