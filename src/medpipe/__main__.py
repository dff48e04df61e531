"""``python -m medpipe``: the ``medpipe`` command (:mod:`medpipe.cli`)."""

from medpipe.cli import exit_process, main

exit_process(main())
