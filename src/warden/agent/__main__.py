import sys

from warden.agent._cli import main

sys.exit(main())
