"""Domain errors raised by the core; the HTTP edge maps each class to one status (server/deps.py)."""

from __future__ import annotations


class LoraswapError(Exception):
    """Base class: the message is safe to show to the client."""

    headers: dict[str, str] | None = None  # extra response headers at the HTTP edge

    def __reduce__(self):
        """Pickle as the same class, message and fields (Ray hands a replica's errors to the ingress): the
        subclasses' __init__ take other arguments than the message, which plain exception pickling passes."""
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type[LoraswapError], args: tuple, fields: dict) -> LoraswapError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(fields)
    return exc


class AdapterNotFound(LoraswapError):
    def __init__(self, name: str, available: list[str]):
        shown = ", ".join(available[:50]) + (" ..." if len(available) > 50 else "")
        super().__init__(f"adapter {name!r} not found; available: [{shown}]")
        self.name = name
        self.available = available


class AdapterInvalid(LoraswapError):
    """Every problem found with an adapter, reported at once."""

    def __init__(self, problems: list[str]):
        super().__init__("invalid adapter: " + "; ".join(problems))
        self.problems = problems


class AdapterForOtherBase(AdapterInvalid):
    """An adapter whose metadata names another base: not broken, just not for the loaded one."""

    def __init__(self, message: str, base: str):
        super().__init__([message])
        self.base = base


class AdapterReadOnly(LoraswapError):
    """An adapter shipped with the package: it can be replaced by an upload, not deleted."""

    def __init__(self, name: str):
        super().__init__(f"adapter {name!r} is shipped with loraswap and cannot be deleted (upload a new version with "
                         "replace=true, or serve without the shipped adapters: shipped_adapters=false)")
        self.name = name


class AdapterExists(LoraswapError):
    def __init__(self, name: str, message: str | None = None):
        super().__init__(message or f"adapter {name!r} already exists; send replace=true to upload a new version")
        self.name = name


class AdapterChanged(LoraswapError):
    """The version a request located was replaced or deleted before it could be loaded."""

    def __init__(self, name: str):
        super().__init__(f"adapter {name!r} was replaced or deleted while this request waited; retry")
        self.name = name


class InvalidInput(LoraswapError):
    """A request that is well-formed JSON but cannot be served (too long, wrong task ...)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(LoraswapError):
    """A file or fine-tuning job that does not exist."""


class PayloadTooLarge(LoraswapError):
    pass


class Unauthorized(LoraswapError):
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(LoraswapError):
    pass


class NotReady(LoraswapError):
    pass


class Overloaded(LoraswapError):
    """The engine holds as many rows or tokens as it may: the client should retry later."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class DeadlineExceeded(LoraswapError):
    """The request's deadline passed before it was answered; its rows left the batch."""


class ClientDisconnected(LoraswapError):
    """The client went away: nobody reads the answer (logged as 499, as nginx does)."""


class Draining(LoraswapError):
    """The server is shutting down: it finishes what it holds and takes nothing new."""
