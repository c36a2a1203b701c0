"""``finegrain annotate``: a local web app in which people minimally edit the rejected responses.

The paper's first step done by people: each annotator opens a personal login link, sees one
pair at a time (the prompt, the preferred response for context, the rejected response in an
editable box), makes the smallest edit that fixes it while a live word diff and the edit ratio
(the measure and threshold of ``finegrain edit``) show how much changed, optionally marks the
flawed spans, and submits. ``finegrain annotate export`` writes the human-edits file that
``finegrain edit --backend file`` reads.

Modules (only :mod:`~finegrain.annotate.app` and :mod:`~finegrain.annotate.server` need the
``annotate`` extra: starlette, jinja2, uvicorn):

- :mod:`~finegrain.annotate.config`: the options of ``serve``, ``add-annotator`` and ``export``;
- :mod:`~finegrain.annotate.store`: the SQLite database (WAL, one transaction per submission);
- :mod:`~finegrain.annotate.queue`: which pair an annotator gets next (``--overlap K``, screening);
- :mod:`~finegrain.annotate.auth`: login tokens (stored as sha256), CSRF tokens;
- :mod:`~finegrain.annotate.inputs`: reading pairs, pre-edits, screening items and guidelines;
- :mod:`~finegrain.annotate.agreement`: changed-word sets, span overlap, screening scores;
- :mod:`~finegrain.annotate.export`: the human-edits file, one edit per pair by a documented rule;
- :mod:`~finegrain.annotate.app`: the Starlette app (pages, JSON API, security headers).
"""
from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "ServeConfig": "finegrain.annotate.config",
    "AddAnnotatorConfig": "finegrain.annotate.config",
    "ExportConfig": "finegrain.annotate.config",
    "add_annotator": "finegrain.annotate.commands",
    "export_annotations": "finegrain.annotate.export",
    "create_app": "finegrain.annotate.app",
    "serve": "finegrain.annotate.server",
}

__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
