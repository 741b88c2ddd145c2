# TEMPORARY during parallel development: the pieces live in _wip/ and are merged into this file later.
from _wip.fast import *  # noqa: F401,F403
from _wip.backbone import *  # noqa: F401,F403
from _wip.action_head import *  # noqa: F401,F403
