import sys

from stratoscope.dashboards.build import main

sys.exit(main())
