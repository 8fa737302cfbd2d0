"""Stream a request into the cell output as its tokens arrive.

Live mode keeps one display (display_id) and updates it as Markdown at most
~10 times a second (each update resends the whole text, so per-token updates
would flood the frontend), then always once more with the complete text and a
footer: the saved notebook shows the same output however the stream was timed.
Plain mode prints the tokens to stdout instead.
"""

from __future__ import annotations

import sys
import time

from IPython.display import display

from engine import Completion, EngineError, RequestHandle

UPDATE_INTERVAL_S = 0.1


def stream_to_cell(handle: RequestHandle, plain: bool = False) -> Completion:
    """Show the request's text as it streams; return its Completion.

    On KeyboardInterrupt (a kernel interrupt) the request is cancelled, which the
    engine applies at its next step, the partial text is shown, and the interrupt
    propagates so that "run all" stops too.
    """
    view = PlainView() if plain else LiveView()
    try:
        for delta in handle:
            view.add(delta.text)
        completion = handle.result()
    except BaseException as e:
        handle.cancel()  # a no-op if the request already ended (an engine error)
        interrupted = isinstance(e, KeyboardInterrupt)
        done = _settled(handle) if interrupted else None
        view.finish(done.text if done else view.text,
                    footer(done) if done else "cancelled" if interrupted else "failed")
        raise
    view.finish(completion.text, footer(completion))
    return completion


def _settled(handle: RequestHandle) -> Completion | None:
    try:
        return handle.result(timeout=10)
    except (TimeoutError, EngineError):
        return None


def footer(c: Completion) -> str:
    u = c.usage
    parts = [f"{u.completion_tokens} tokens", f"prompt {u.prompt_tokens} ({u.cached_tokens} cached)",
             f"TTFT {u.ttft_s * 1000:.0f} ms", f"{u.decode_tps:.1f} tok/s"]
    acceptance = getattr(u, "acceptance_rate", None)  # present once speculative decoding is
    if acceptance is not None:
        parts.append(f"acceptance {acceptance:.0%}")
    parts.append(c.finish_reason)
    return " · ".join(parts)


def markdown(text: str) -> str:
    """`text` as Markdown that a footer can follow: close a code fence left open."""
    fences = sum(line.lstrip().startswith("```") for line in text.splitlines())
    return text + "\n```" if fences % 2 else text


class LiveView:
    def __init__(self):
        self.text = ""
        self._last = time.monotonic()
        self._display = display({"text/plain": "…", "text/markdown": "…"}, raw=True, display_id=True)

    def add(self, text: str) -> None:
        self.text += text
        if text and time.monotonic() - self._last >= UPDATE_INTERVAL_S:
            self._show(markdown(self.text), self.text)

    def finish(self, text: str, footer: str) -> None:
        self._show(f"{markdown(text)}\n\n*{footer}*", f"{text}\n\n{footer}")

    def _show(self, md: str, plain: str) -> None:
        self._display.update({"text/markdown": md, "text/plain": plain}, raw=True)
        self._last = time.monotonic()


class PlainView:
    def __init__(self):
        self.text = ""

    def add(self, text: str) -> None:
        self.text += text
        sys.stdout.write(text)  # ipykernel sends stdout in batches on its own

    def finish(self, text: str, footer: str) -> None:
        if text.startswith(self.text):  # deltas the loop did not get to (after a cancel)
            sys.stdout.write(text[len(self.text):])
        print(f"\n\n{footer}", flush=True)
