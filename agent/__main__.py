"""``python -m agent``: run the agent daemon without twistd (see L{agent.launcher})."""

import sys

from agent.launcher import main

sys.exit(main())
