"""The chat page that ``livelm serve`` shows at ``/`` (static files, no build step), and
the small route it needs: the chat template rendered as text (``POST /v1/chat/template``).

The page's own code is ``static/app.js``; the front-end libraries it uses are vendored
release files under ``static/vendor/`` (versions and licences in ``VENDORED.md`` there).
"""

from livelm.entrypoints.openai.web.routes import (
    STATIC_DIR,
    add_template_route,
    add_web_ui_routes,
)

__all__ = ["STATIC_DIR", "add_template_route", "add_web_ui_routes"]
