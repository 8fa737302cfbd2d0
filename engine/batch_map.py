"""engine.map: many prompts through the batch, from a notebook.

Prompts are submitted ahead of the batch (a bounded window, so the waiting queue
never overflows) and collected in order as they finish, behind a tqdm bar. Every
row gets a Completion: a row that failed (a prompt too long, an output that does
not parse against its schema) carries the reason in `.error` instead of vanishing,
and Ctrl-C cancels what is still running and returns the rows already done, the
others marked cancelled.
"""

from __future__ import annotations

import threading
from typing import Iterable

from tqdm.auto import tqdm

from .errors import EngineError, InvalidRequestError
from .outputs import Completion, Usage
from .sampling.params import SamplingParams


def failed(error: BaseException | str, reason: str = "error") -> Completion:
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return Completion(text="", token_ids=[], finish_reason=reason, usage=Usage(), error=message)


def run_map(engine, prompts: Iterable, params: SamplingParams | None, kwargs: dict,
            progress: bool = True) -> list[Completion]:
    if params is not None and kwargs:
        raise InvalidRequestError("pass either a SamplingParams or keyword arguments, not both")
    if "schema" in kwargs:
        kwargs["json_schema"] = kwargs.pop("schema")
    params = params or SamplingParams(**kwargs)  # a bad parameter fails before anything runs
    prompts = list(prompts.tolist() if hasattr(prompts, "tolist") else prompts)  # pandas Series too
    results: list[Completion | None] = [None] * len(prompts)
    window = max(2 * engine.config.max_batch, 1)  # enough to keep every batch slot busy
    handles: dict[int, object] = {}
    finished = threading.Semaphore(0)  # released once per finished handle
    next_row = 0

    def submit_more() -> None:
        nonlocal next_row
        while next_row < len(prompts) and len(handles) < window:
            i, next_row = next_row, next_row + 1
            try:
                handles[i] = engine.submit(prompts[i], params, source="map")
                handles[i].add_done_callback(lambda _h: finished.release())
            except EngineError as e:  # this row only: a prompt too long, ...
                results[i] = failed(e)
                bar.update()

    with tqdm(total=len(prompts), desc="engine.map", unit="prompt", disable=not progress) as bar:
        try:
            submit_more()
            while handles:
                finished.acquire()
                for i in [i for i, h in handles.items() if h.done]:
                    h = handles.pop(i)
                    try:
                        results[i] = h.result()
                    except EngineError as e:
                        results[i] = failed(e)
                    bar.update()
                submit_more()
        except KeyboardInterrupt:
            for h in handles.values():
                h.cancel()
            for i, h in handles.items():  # rows finished in the meantime are kept
                if h.done:
                    try:
                        results[i] = h.result()
                    except EngineError:
                        pass
            done = sum(r is not None for r in results)
            bar.write(f"engine.map: interrupted; {done} of {len(prompts)} rows done, the rest cancelled")
    return [r if r is not None else failed("interrupted before it finished (Ctrl-C)", "cancelled")
            for r in results]
