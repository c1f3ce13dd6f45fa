"""Entry point of the guest agent (``python3 -m cocoon.agent``)."""

from cocoon.agent.main import main

raise SystemExit(main())
