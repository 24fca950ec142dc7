"""The web console at ``/console``: server-rendered page shells (navigation, title, the
page's module) and hand-written ES modules that call the public JSON API with the key
the person logged in with. No build step; assets are read once at start and served
with a content hash in their URL (cached for a year, immutable)."""
