"""The vendored front-end files are exactly the ones api/static/vendor/README.md records."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

VENDOR = Path(__file__).parent.parent / "api" / "static" / "vendor"


def test_vendored_files_match_their_recorded_checksums():
    recorded = dict((path, digest) for digest, path in
                    re.findall(r"^([0-9a-f]{64})  (\S+)$", (VENDOR / "README.md").read_text(), flags=re.M))
    assert set(recorded) == {"cytoscape/cytoscape.min.js", "redoc/redoc.standalone.js",
                             "swagger-ui/swagger-ui-bundle.js", "swagger-ui/swagger-ui.css",
                             "swagger-ui/favicon-32x32.png"}
    for path, digest in recorded.items():
        assert hashlib.sha256((VENDOR / path).read_bytes()).hexdigest() == digest, path
