"""`python -m gpgpu_agent …` is `gpgpu-agent …`."""

from gpgpu_agent.cli import main

raise SystemExit(main())
