"""What serve_load.py's two TorchServe handlers share (shipped beside them with ``--extra-files``): the
TorchServe entry point and the request bodies.

TorchServe imports a handler file by its module name from the model folder, where the extra files are too;
a handler file defines a :class:`Handler` with its own ``initialize`` (load once per worker) and ``handle``
(one batch of requests in, one answer per request out) and exposes ``handle = entry(TheHandler())``.
"""


def request_bodies(data) -> list[bytes]:
    """The image bytes of each request in a TorchServe batch (a raw body arrives as ``data`` or ``body``)."""
    return [bytes(row.get("data") or row.get("body")) for row in data]


class Handler:
    """A worker's model: :meth:`initialize` loads it once, :meth:`handle` answers one TorchServe batch."""

    def __init__(self):
        self.initialized = False

    def initialize(self, context) -> None:
        raise NotImplementedError

    def handle(self, data, context) -> list[str]:
        raise NotImplementedError


def entry(service: Handler):
    """TorchServe's function entry point over ``service``: its first call (``data`` None) initializes it."""

    def handle(data, context):
        if not service.initialized:
            service.initialize(context)
            service.initialized = True
        if data is None:
            return None
        return service.handle(data, context)

    return handle
