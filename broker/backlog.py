"""Shrinking a slow reader's backlog: lossless coalescing first, then the channel's policy.

Theory of operation
-------------------
An :class:`~broker.outbox.Outbox` queues opaque bytes: the publication frames
shared by every subscriber, replies, pings. Only a reader that falls behind
has a queue worth looking into, so the structure is recovered here, on the
slow path, rather than carried on the fan-out path: the queued bytes are split
into WebSocket frames (:func:`protocol.split_ws_frames`), their msgpack frames
decoded, rewritten, and encoded again into one private ``bytes`` object.

Coalescing joins consecutive publications of one channel whose event is
listed in the channel's ``coalesce`` options (``ai:token`` on ``token`` by
default) into one ``ev`` whose field is the concatenated text, whose ``o`` is
the last offset it covers and whose ``o0`` the first. Publications join only
when their offsets are consecutive and their data are equal apart from that
field, so nothing is lost; a client that appends ``data.token`` sees the same
text. Replies (``ok``, ``err``), ``gap``, ``bye`` and bytes that are not
publications end every run, so no publication moves across them.

Dropping (``slow_policy = "drop"``) removes a channel's queued publications
except its ``keep_events`` and puts a ``gap`` naming the dropped offsets where
the first of them was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from broker.config import ChannelOptions, SlowPolicy
from protocol import Opcode, split_ws_frames, ws_frame

Unit = dict[str, Any] | bytes  # a decoded protocol frame, or bytes passed through as they are


@dataclass(frozen=True, slots=True, kw_only=True)
class BacklogStatistics:
    coalesced: int  #: publications merged into others for slow readers
    dropped: int  #: publications dropped for slow readers (``slow_policy = "drop"``)


def _first(unit: dict[str, Any]) -> int:
    first = unit.get("o0")
    return unit["o"] if first is None else int(first)


class Backlog:
    """The broker's backlog shrinker, shared by every outbox. Not thread-safe."""

    def __init__(self, options: Callable[[str], ChannelOptions]) -> None:
        self._options = options
        self._coalesced = 0
        self._dropped = 0

    def statistics(self) -> BacklogStatistics:
        return BacklogStatistics(coalesced=self._coalesced, dropped=self._dropped)

    def shrink(self, items: list[bytes | memoryview], *, drop: bool) -> list[bytes]:
        """The same frames as ``items``, coalesced (and with ``drop``, dropped) where allowed.

        ``items`` must start at a frame boundary (the outbox keeps a half-written frame out).
        """
        units = self._decode(items)
        units = self._coalesce(units)
        if drop:
            units = self._drop(units)
        out = b"".join(unit if isinstance(unit, bytes) else ws_frame(msgpack.packb(unit, use_bin_type=True))
                       for unit in units)
        return [out] if out else []

    # -- steps ----------------------------------------------------------------------

    @staticmethod
    def _decode(items: list[bytes | memoryview]) -> list[Unit]:
        units: list[Unit] = []
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=0)
        for item in items:
            frames = split_ws_frames(item)
            if frames is None:
                units.append(bytes(item))
                continue
            for opcode, start, payload, end in frames:
                if opcode is not Opcode.BINARY:
                    units.append(bytes(item[start:end]))
                    continue
                unpacker.feed(item[payload:end])
                units.extend(unpacker)
        return units

    def _coalesce(self, units: list[Unit]) -> list[Unit]:
        out: list[Unit] = []
        open_runs: dict[str, int] = {}  # channel -> index in out of the ev later tokens may join
        texts: dict[int, list[str]] = {}  # index in out -> pieces of its coalesced field
        for unit in units:
            if isinstance(unit, bytes) or unit.get("t") != "ev":
                open_runs.clear()
                out.append(unit)
                continue
            channel, data = unit["ch"], unit.get("d")
            field = self._options(channel).coalesce.get(unit["ev"])
            if field is None or not isinstance(data, dict) or not isinstance(data.get(field), str):
                open_runs.pop(channel, None)
                out.append(unit)
                continue
            index = open_runs.get(channel)
            if index is not None:
                run = out[index]
                assert isinstance(run, dict)
                if (run["ev"] == unit["ev"] and run["o"] + 1 == _first(unit)
                        and data.keys() == run["d"].keys()
                        and all(v == run["d"][k] for k, v in data.items() if k != field)):
                    texts.setdefault(index, [run["d"][field]]).append(data[field])
                    run["o0"] = _first(run)
                    run["o"] = unit["o"]
                    self._coalesced += 1
                    continue
            open_runs[channel] = len(out)
            out.append(unit)
        for index, pieces in texts.items():
            run = out[index]
            assert isinstance(run, dict)
            run["d"][self._options(run["ch"]).coalesce[run["ev"]]] = "".join(pieces)
        return out

    def _drop(self, units: list[Unit]) -> list[Unit]:
        out: list[Unit] = []
        open_gaps: dict[str, dict[str, Any]] = {}  # channel -> the gap later drops extend
        for unit in units:
            if isinstance(unit, bytes):
                out.append(unit)
                continue
            kind, channel = unit.get("t"), unit.get("ch")
            if not isinstance(channel, str) or kind not in ("ev", "gap"):
                out.append(unit)
                continue
            options = self._options(channel)
            droppable = (kind == "ev" and options.slow_policy is SlowPolicy.DROP
                         and unit["ev"] not in options.keep_events)
            gap = open_gaps.get(channel)
            if kind == "gap" or droppable:
                if gap is not None and gap["o"] + 1 == _first(unit):
                    gap["o"] = unit["o"]
                else:
                    gap = open_gaps[channel] = {"t": "gap", "ch": channel, "o0": _first(unit), "o": unit["o"]}
                    out.append(gap)
                if droppable:
                    self._dropped += unit["o"] - _first(unit) + 1
                continue
            open_gaps.pop(channel, None)
            out.append(unit)
        return out
