"""One section of a benchmark case: set up every method, time them together, record one result each.

:class:`SectionRunner` holds what the sections of a case share: the memory
budget (``--mem-gb``; the weights, the section's inputs and every method set
up so far count against it, since all of them stay allocated while the
methods are timed together), the timing (round-robin by default, see
:mod:`.timing`; each timing carries the SM clock it ran at, :mod:`.clocks`)
and the recording of results, failures included. The
benchmark's methods themselves are set up by :class:`.runner.CaseRunner`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ...runtime.timing import time_interleaved, time_ms, time_sequential
from .clocks import ClockSampler, summarize
from .gpu import WeightCache, describe_error, free_pool
from .report import Result
from .workloads import Case, gbs, tflops

__all__ = ["Timed", "SectionRunner", "SETUP_LAST", "BUDGET_MS"]

# Set up last: a padded layout can be many times the packed rows, so when memory
# is short it is the one skipped, not AUTO or the packed methods after it.
SETUP_LAST = ("padded_strided",)
BUDGET_MS = 2000.0  # timed calls per method, about (never fewer than 20)


@dataclass
class Timed:
    """One method of a section, set up and ready to time.

    ``fn(i)`` runs one call on input set ``i`` (of ``sets``); ``finish``
    turns the timing into the method's :class:`Result`; ``nbytes`` is what
    its inputs and outputs hold on the GPU until the section ends.
    """

    method: str
    fn: Callable[[int], object]
    sets: int
    finish: Callable[[dict], Result]
    nbytes: int = 0


class SectionRunner:
    """Memory budget, timing and results shared by the sections of one case."""

    def __init__(self, case: Case, args: argparse.Namespace, weights: WeightCache):
        self.case = case
        self.args = args
        self.weights = weights
        self.results: list[Result] = []
        self.reverse = False  # --timing sequential: methods in reverse order (odd passes)
        self.held = 0  # bytes the section's set-up methods hold
        self.spare: tuple[str, ...] = ()  # weights the section may drop to make room
        self.budget = int(args.mem_gb * 1e9)
        self.clock = _clock_sampler()

    # -- results and memory ------------------------------------------------------------------------------
    def result(self, section: str, method: str, **kw) -> Result:
        """A :class:`Result` of this case (not yet recorded)."""
        c = self.case
        return Result(c.name, c.model, c.tokens, c.routing, c.phase, section, method, **kw)

    def measured(
        self, section: str, method: str, t: dict, flops: int | None, nbytes: int | None, **kw
    ) -> Result:
        """The result of a timing: median, spread, and the rates it implies."""
        ms = t["median"]
        bw = gbs(nbytes, ms) if (self.case.phase == "decode" and nbytes) else None
        extra = {**kw.pop("extra", {}), **({"clock": t["clock"]} if t.get("clock") else {})}
        return self.result(
            section,
            method,
            ms=ms,
            p10=t["p10"],
            p90=t["p90"],
            tflops=tflops(flops, ms) if flops else None,
            gbs=bw,
            pct_hbm=100.0 * bw / self.args.hbm_gbs if bw is not None else None,
            samples=t["samples"],
            extra=extra,
            **kw,
        )

    def fits(self, extra_bytes: int) -> str | None:
        """None when ``extra_bytes`` more fit beside the weights and the section's
        other methods (dropping a spare weight if that makes room); else why not."""
        need = self.weights.nbytes() + self.held + extra_bytes
        for which in self.spare:
            if need > self.budget and self.weights.holds(which):
                self.weights.drop(which)  # made again by the section that needs it
                need = self.weights.nbytes() + self.held + extra_bytes
        if need > self.budget:
            return (
                f"skipped: needs ~{need / 1e9:.1f} GB with the weights and the other methods' "
                f"inputs, over --mem-gb {self.args.mem_gb:g}"
            )
        return None

    # -- timing ------------------------------------------------------------------------------------------
    def timing_kwargs(self) -> dict:
        """Warm-up, repeats and the time budget every timing of this run uses."""
        args = self.args
        return dict(
            warmup=args.warmup, repeat=args.repeat, min_repeat=min(20, args.repeat), budget_ms=BUDGET_MS
        )

    def time_one(self, fn: Callable[[int], object], sets: int, hold=None) -> dict:
        """Time a method that is compared with no other (the routing kernel, the
        graph); ``hold`` as :func:`~cublas_grouped.runtime.timing.time_ms` takes it."""
        with self.clock.sampling() as samples:
            t = time_ms(fn, rotate=sets, hold=hold, **self.timing_kwargs())
        return _with_clock([t], samples)[0]

    def capture_graphs(self, call: Callable[[object], object], inputs: Sequence) -> tuple[list, object]:
        """``call(x)`` captured in a CUDA graph per input set, on a stream of
        its own: (the graphs, that stream). One eager call first compiles and
        allocates outside the capture."""
        import cupy

        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            call(inputs[0])
            stream.synchronize()
            graphs = []
            for x in inputs:
                stream.begin_capture()
                call(x)
                graphs.append(stream.end_capture())
        return graphs, stream

    def time_graphs(self, call: Callable[[object], object], inputs: Sequence) -> dict:
        """Time ``call(x)`` replayed from CUDA graphs (:meth:`capture_graphs`),
        alone, on the capture's stream."""
        graphs, stream = self.capture_graphs(call, inputs)
        with stream:
            return self.time_one(lambda i: graphs[i].launch(stream), len(graphs))

    def time_methods(self, ready: Sequence[Timed]) -> list[dict | Exception]:
        """Time the set-up methods of one section together."""
        fns, sets = [t.fn for t in ready], [t.sets for t in ready]
        with self.clock.sampling() as samples:
            if self.args.timing == "sequential":
                order = range(len(ready) - 1, -1, -1) if self.reverse else range(len(ready))
                times = time_sequential(fns, sets=sets, order=order, **self.timing_kwargs())
            else:
                times = time_interleaved(fns, sets=sets, **self.timing_kwargs())
        return _with_clock(times, samples)

    def run_section(
        self,
        section: str,
        setups: Sequence[tuple[str, Callable[[], Timed | Result]]],
        held: int = 0,
        spare: tuple[str, ...] = (),
    ) -> None:
        """Set up every method (``setup()`` gives a :class:`Timed`, or a :class:`Result`
        saying why it does not run), time those that are ready together, and record
        one result per method in the order of ``setups``.

        ``held``: bytes the section's shared inputs hold; ``spare``: weights a
        method's setup may drop to fit.
        """
        self.held, self.spare = held, spare
        outcome: dict[str, Result] = {}
        ready: list[Timed] = []
        for method, setup in sorted(setups, key=lambda s: s[0] in SETUP_LAST):
            try:
                got = setup()
            except Exception as exc:
                outcome[method] = self.result(section, method, error=describe_error(exc))
                continue
            if isinstance(got, Result):
                outcome[method] = got
            else:
                ready.append(got)
                self.held += got.nbytes
        try:
            self._time_ready(section, ready, outcome)
        except Exception as exc:  # the timing itself failed (an event, a synchronize): no method has a time
            for timed in ready:
                outcome.setdefault(
                    timed.method, self.result(section, timed.method, error=describe_error(exc))
                )
        finally:
            self.results += [outcome[m] for m, _ in setups if m in outcome]
            ready.clear()  # the methods' inputs go back to the pool
            self.held, self.spare = 0, ()
            free_pool()

    def _time_ready(self, section: str, ready: Sequence[Timed], outcome: dict[str, Result]) -> None:
        for timed, t in zip(ready, self.time_methods(ready)):
            try:
                if isinstance(t, Exception):
                    raise t
                outcome[timed.method] = timed.finish(t)
            except Exception as exc:
                outcome[timed.method] = self.result(section, timed.method, error=describe_error(exc))

    def guarded(self, section: str, method: str, body: Callable[[], Result]) -> None:
        """Run one method that is timed on its own; record its result or its error."""
        try:
            self.results.append(body())
        except Exception as exc:
            self.results.append(self.result(section, method, error=describe_error(exc)))
        finally:
            free_pool()


_samplers: dict[str | None, ClockSampler] = {}


def _clock_sampler() -> ClockSampler:
    """The clock sampler of the current GPU (one per device and process); one
    that samples nothing where the device has no PCI bus id to ask NVML by."""
    try:
        import cupy

        bus = cupy.cuda.Device().pci_bus_id
    except Exception:  # a stand-in GPU, or no CuPy
        bus = None
    sampler = _samplers.get(bus)
    if sampler is None:
        sampler = _samplers[bus] = ClockSampler(bus)
    return sampler


def _with_clock(times: list, samples) -> list:
    """Each timing of ``times`` (dicts; an exception stays as it is) with the
    clock summary of ``samples`` under "clock" (none without samples)."""
    clock = summarize(samples)
    return [{**t, "clock": clock} if isinstance(t, dict) and clock else t for t in times]
