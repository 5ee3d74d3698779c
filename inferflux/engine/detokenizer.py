"""Streaming detokenization with stop strings, one generated token at a time.

The engine turns each sampled token into text the moment it arrives, so clients
see output with the least delay. Stop strings make that harder: one may arrive
split over several tokens ("###" as "#" then "##"), and OpenAI/vLLM semantics
say the returned text ends right before it, so none of it may have been sent by
the time it is recognised. `StreamDetokenizer` therefore holds back the shortest
tail of not-yet-sent text that could still grow into a stop string, and releases
it as soon as it cannot.

UTF-8 safety comes from `IncrementalDecoder` (it never returns half a character);
this class only works on the text it returns.
"""

from __future__ import annotations

from collections.abc import Sequence

from inferflux.formats.tokenizer import Tokenizer


class StreamDetokenizer:
    """Text of one generated sequence, token by token, cut before the first stop string.

    Call `push` once per generated token and `finish` once at the end. Every character
    returned is final: the concatenation of all returns is `text`, which never contains a
    stop string. Work per token is proportional to the new text plus the longest stop
    string, never to the text generated so far: only a tail window is searched.

    Rules:

    * a stop string may span tokens and start or end mid-token; the first time any stop
      string is complete, the text is cut before the earliest-starting one present (so with
      overlapping stop strings the cut depends on which completes first, as in vLLM);
    * at most `max(len(s) for s in stop) - 1` characters are held back, and only the
      longest tail that is a proper prefix of some stop string: text that cannot begin
      one goes out in the same `push`; with no stop strings nothing is held back;
    * empty stop strings are ignored (they would stop every sequence before its first
      character, which no API means by them).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        stop: Sequence[str] | None,
        skip_special_tokens: bool = True,
    ) -> None:
        # The decoder sees the prompt's last tokens as context, so SentencePiece's leading
        # space and multi-token characters come out as they would in a full decode.
        self._decoder = tokenizer.incremental_decoder(prompt_ids, skip_special_tokens)
        if isinstance(stop, str):  # a bare string is one stop string, not a list of characters
            stop = [stop]
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stop or () if s))
        self._pending = ""  # decoded but not emitted: a proper prefix of some stop string
        self._pieces: list[str] = []  # everything emitted, joined lazily by `text`
        self._text = ""
        self._joined = 0  # how many of _pieces `_text` holds
        self._stop_string: str | None = None
        self._finished = False

    @property
    def stopped(self) -> bool:
        """True once a stop string appeared; the engine then ends the sequence."""
        return self._stop_string is not None

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the text (OpenAI/vLLM report it as the stop reason), else None."""
        return self._stop_string

    @property
    def text(self) -> str:
        """All text emitted so far (never includes a stop string or anything after one)."""
        if self._joined < len(self._pieces):  # join only what is new, once per change
            self._text += "".join(self._pieces[self._joined :])
            self._joined = len(self._pieces)
        return self._text

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that is now certain ('' after a stop)."""
        if self._finished:
            raise RuntimeError("push() after finish(): the sequence has already ended")
        if self.stopped:
            return ""
        return self._take(self._decoder.step(token_id), final=False)

    def finish(self) -> str:
        """At the end of generation: the held-back text plus the decoder's flush ('' after a stop).

        The flushed text (a truncated character becomes U+FFFD) is still checked for stop
        strings, so `text` never contains one. Calling it again returns ''.
        """
        if self._finished or self.stopped:
            self._finished = True
            return ""
        self._finished = True
        return self._take(self._decoder.flush(), final=True)

    def _take(self, new: str, final: bool) -> str:
        """Append `new` to the unsent text; emit what is certain, cut at a stop string."""
        if not self._stops:
            return self._emit(new)
        if not new and not final:
            return ""
        buf = self._pending + new  # at most max_stop - 1 + len(new) characters
        cut = self._find_stop(buf, len(self._pending))
        if cut is not None:
            self._pending = ""
            return self._emit(buf[:cut])
        keep = 0 if final else self._held_back(buf)
        self._pending = buf[len(buf) - keep :] if keep else ""
        return self._emit(buf[: len(buf) - keep])

    def _find_stop(self, buf: str, old_len: int) -> int | None:
        """Start of the earliest stop string in `buf`, which may only end in the new text.

        `buf[:old_len]` was searched before and held none, so a match must end past
        `old_len`; searching from `old_len - len(s) + 1` keeps the work to the tail window.
        """
        best: int | None = None
        for s in self._stops:  # on a tie the one listed first wins, as in vLLM
            at = buf.find(s, max(0, old_len - len(s) + 1))
            if at >= 0 and (best is None or at < best):
                best, self._stop_string = at, s
        return best

    def _held_back(self, buf: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of a stop string.

        Any earlier position can no longer start a stop string (the text after it already
        differs from every one), so everything before this tail is safe to send now.
        """
        keep = 0
        n = len(buf)
        for s in self._stops:
            for k in range(min(len(s) - 1, n), keep, -1):
                if buf.startswith(s[:k], n - k):
                    keep = k
                    break
        return keep

    def _emit(self, piece: str) -> str:
        if piece:
            self._pieces.append(piece)
        return piece
