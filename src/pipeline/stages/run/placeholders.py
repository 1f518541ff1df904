"""The placeholders of a pipeline file, `${name}` and `${name.key}` (a var, a stage's argument, `round.*`,
`rounds.*`, `env.*`): one pattern, read by the file's checks (`spec`), the rounds' unrolling (`rounds`) and
the resolution of each stage's arguments (`plan`)."""

from __future__ import annotations

import re

REFERENCE = re.compile(r"\$\{([A-Za-z_][\w-]*)(?:\.([A-Za-z_]\w*))?\}")
