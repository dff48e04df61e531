"""HTTP inference service (the ``serve`` extra): see :mod:`medpipe.serve.app`."""
