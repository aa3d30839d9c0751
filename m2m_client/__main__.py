"""``python -m m2m_client``: the same as the ``m2m-client`` command."""

from __future__ import annotations

import sys

from m2m_client.cli import main

if __name__ == "__main__":
    sys.exit(main())
