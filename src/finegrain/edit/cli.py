"""``finegrain edit``: minimally edit the rejected response of each pair (see :mod:`finegrain.edit.core`)."""
from __future__ import annotations

from ..config import config_command
from .core import EditConfig, edit_pairs

configure, run = config_command(EditConfig, edit_pairs)
