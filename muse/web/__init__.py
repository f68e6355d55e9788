"""Server-rendered HTMX pages: the studio, job cards, the gallery and login."""
