"""Text out of the engine: incremental detokenization and stop strings, matched in linear time.

Both run in the engine's one scheduler thread on every generated token, so their cost bounds every
request's step time; the request schema (schemas.py) and SamplingParams refuse more or longer stop strings
than MAX_STOPS and MAX_STOP_CHARS.
"""

from __future__ import annotations

MAX_STOPS, MAX_STOP_CHARS = 4, 512


class StopMatcher:
    """Finds the earliest stop string in text that arrives in pieces, in time linear in the text.

    One Knuth-Morris-Pratt automaton per stop string (SIAM J. Comput. 1977): its state is the length of
    the longest prefix of the stop string that ends the text so far, which is also how much text must be
    held back. A character costs amortized O(1) per stop string and a piece of n characters at most
    O(n + len(stop)), where trying every prefix on every token cost O(len(stop)^2) (four stop strings of
    200,000 characters took ~1 s per token and stalled every other request).
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.borders = [_borders(stop) for stop in stops]
        self.states = [0] * len(stops)
        self.position = 0  # characters fed so far
        self.steps = 0  # automaton transitions, for tests of the cost

    @property
    def hold(self) -> int:
        """Characters at the end of the text that could begin a stop string (at most its length - 1)."""
        return max(self.states, default=0)

    def feed(self, text: str) -> int | None:
        """Append text; returns where (in all the text fed) the earliest completed stop string starts."""
        earliest = None
        for index, (stop, borders) in enumerate(zip(self.stops, self.borders)):
            state, steps = self.states[index], 0
            for offset, char in enumerate(text):
                while state and stop[state] != char:  # fall back to the longest border that may continue
                    state, steps = borders[state], steps + 1
                if stop[state] == char:
                    state += 1
                steps += 1
                if state == len(stop):
                    start = self.position + offset + 1 - state
                    earliest = start if earliest is None else min(earliest, start)
                    state = borders[state]
                    break  # a later match of the same string starts later
            self.states[index] = state
            self.steps += steps
        self.position += len(text)
        return earliest

    def reset(self) -> None:
        """Forget partial matches: text already sent cannot be cut any more."""
        self.states = [0] * len(self.stops)


def _borders(text: str) -> list[int]:
    """borders[k]: length of the longest proper prefix of text[:k] that is also its suffix (KMP's table)."""
    borders, length = [0] * (len(text) + 1), 0
    for i in range(1, len(text)):
        while length and text[i] != text[length]:
            length = borders[length]
        if text[i] == text[length]:
            length += 1
        borders[i + 1] = length
    return borders


class TextStream:
    """Incremental detokenization plus stop strings for one sequence.

    Decoding each token alone breaks multi-byte characters and word-boundary spaces, so we decode a
    window that starts a few tokens back and emit only what it adds; a trailing U+FFFD means a character
    is still incomplete and we wait. Text that could be the start of a stop string is held back (at most
    the longest stop string's length - 1 characters) until it either completes the stop string (then
    dropped) or cannot any more (then emitted).
    """

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids = list(prompt_ids[-4:])  # context for the first tokens' spacing
        self.prefix = 0  # decoding window start in self.ids
        self.read = len(self.ids)  # tokens before this are already decoded
        self.held = ""  # decoded text not emitted yet
        self.matcher = StopMatcher(stop)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; returns (text to emit now, whether a stop string was reached)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        window = self._decode(self.ids[self.prefix :])
        new = ""
        if len(window) > len(before) and not window.endswith("\ufffd"):
            new = window[len(before) :]
            self.held += new
            self.prefix, self.read = self.read, len(self.ids)
        if not self.stop:
            return self.flush(), False
        start = self.matcher.feed(new)  # in the matcher's coordinates: all text since the last flush
        unsent = self.matcher.position - len(self.held)  # where self.held starts in those coordinates
        if start is not None:  # a stop string starts in the held text: holding back ensured it
            delta, self.held = self.held[: start - unsent], ""
            return delta, True
        return self._emit(len(self.held) - self.matcher.hold), False

    def flush(self) -> str:
        self.matcher.reset()
        return self._emit(len(self.held))

    def _emit(self, count: int) -> str:
        delta, self.held = self.held[:count], self.held[count:]
        return delta
