"""Error types. Every user-facing error names the node, the input and the fix."""

from __future__ import annotations


class FinetuneError(Exception):
    """A problem the user can fix: bad input, a missing file, an unsupported model.

    The message reads ``[Node] input 'name': what is wrong. Fix: what to do.`` so that
    ComfyUI's error dialog and the headless runner both show something actionable.
    """

    def __init__(self, message: str, *, node: str | None = None, input: str | None = None, fix: str | None = None):
        self.node = node
        self.input = input
        self.fix = fix
        self.detail = message
        super().__init__(self._format())

    def _format(self) -> str:
        parts = []
        if self.node:
            parts.append(f"[{self.node}]")
        if self.input:
            parts.append(f"input '{self.input}':")
        parts.append(self.detail.rstrip("."))
        text = " ".join(parts) + "."
        if self.fix:
            text += f" Fix: {self.fix.rstrip('.')}."
        return text

    def with_node(self, node: str) -> FinetuneError:
        """Return a copy of this error attributed to ``node`` (if it names none yet)."""
        if self.node:
            return self
        err = type(self).__new__(type(self))
        FinetuneError.__init__(err, self.detail, node=node, input=self.input, fix=self.fix)
        return err


class Interrupted(Exception):
    """Raised headless when the user cancels (Ctrl-C). Inside ComfyUI the host's own exception is used."""


class WorkflowError(FinetuneError):
    """A workflow file that cannot be executed: unknown node, dangling link, bad JSON."""
