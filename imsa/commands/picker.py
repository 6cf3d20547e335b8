"""The profile picker: a filterable list on the terminal when assume, export or console get no PROFILE.

Type to filter (case-insensitive, every word must appear), Up/Down or Ctrl-P/Ctrl-N to move, Enter to choose,
Esc, Ctrl-C or Ctrl-D to cancel (KeyboardInterrupt: exit 130, nothing changed). The profile the service serves is
marked with ``*``. Everything is drawn on /dev/tty, so stdout stays data (``eval "$(imsa export)"`` works).
"""

import os

from imsa.errors import UsageError

# Rows of the list shown at once; the rest scrolls.
VISIBLE = 10
PROMPT = "profile> "
ESCAPE, ENTER, BACKSPACE = b"\x1b", (b"\r", b"\n"), (b"\x7f", b"\x08")
CANCEL = (b"\x03", b"\x04")
UP, DOWN = (b"\x1b[A", b"\x1bOA", b"\x10"), (b"\x1b[B", b"\x1bOB", b"\x0e")


def matches(names, query):
    """The names that hold every word of *query* (case-insensitive), in order."""
    words = query.lower().split()
    return [name for name in names if all(word in name.lower() for word in words)]


class Picker:
    """The picker's state: the query, the matches, the highlighted row; draws itself on a terminal fd."""

    def __init__(self, names, active=None):
        self.names = list(names)
        self.active = active
        self.query = ""
        self.index = 0
        self.drawn = 0

    @property
    def shown(self):
        """The names that match the query."""
        return matches(self.names, self.query)

    def key(self, data):
        """Apply one key press (bytes); returns the chosen name, or None to go on. KeyboardInterrupt cancels."""
        if data in CANCEL or data == ESCAPE:
            raise KeyboardInterrupt
        if data in ENTER:
            shown = self.shown
            return shown[self.index] if shown else None
        if data in UP:
            self.index = max(self.index - 1, 0)
        elif data in DOWN:
            self.index = min(self.index + 1, max(len(self.shown) - 1, 0))
        elif data in BACKSPACE:
            self.query, self.index = self.query[:-1], 0
        elif data.startswith(ESCAPE):
            pass  # another escape sequence (Left, Home...): nothing to do
        else:
            text = data.decode("utf-8", "ignore")
            if text.isprintable():
                self.query, self.index = self.query + text, 0
        return None

    def render(self):
        """The text that redraws the picker over what it drew last (ANSI: up, clear to the end of the screen)."""
        shown = self.shown
        start = min(max(self.index - VISIBLE + 1, 0), max(len(shown) - VISIBLE, 0))
        lines = []
        for position, name in enumerate(shown[start:start + VISIBLE], start):
            pointer = ">" if position == self.index else " "
            mark = "*" if name == self.active else " "
            lines.append(f"{pointer}{mark} {name}")
        if not shown:
            lines.append("   (no profile matches)")
        lines.append(f"   {len(shown)}/{len(self.names)}  (Enter: choose, Esc: cancel)")
        up = f"\x1b[{self.drawn}A" if self.drawn else ""
        self.drawn = len(lines)
        return f"{up}\r\x1b[J" + "\r\n".join(lines) + "\r\n" + PROMPT + self.query


def _read_key(fd):
    """One key press: a byte, or a whole escape sequence when the bytes of one arrive together."""
    data = os.read(fd, 1)
    if data == ESCAPE:
        import select

        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            data += os.read(fd, 8)
    return data


def pick(names, active=None, tty_path="/dev/tty"):
    """Let the person choose one of *names* on the terminal; KeyboardInterrupt when they cancel."""
    import termios
    import tty

    fd = os.open(tty_path, os.O_RDWR | os.O_NOCTTY)
    saved = termios.tcgetattr(fd)
    picker = Picker(names, active)
    try:
        tty.setraw(fd)
        os.write(fd, picker.render().encode())
        while True:
            data = _read_key(fd)
            if not data:
                raise KeyboardInterrupt
            chosen = picker.key(data)
            if chosen is not None:
                return chosen
            os.write(fd, picker.render().encode())
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        os.write(fd, f"\x1b[{picker.drawn}A\r\x1b[J".encode() if picker.drawn else b"")
        os.close(fd)


def has_terminal():
    """True when /dev/tty can be opened (a person may be asked)."""
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        return False
    return True


def choose_profile(command, client=None):
    """The profile a person picks for *command* (assume, export, exec, console); UsageError without a terminal."""
    from imsa import config
    from imsa.errors import ImsaError

    if not has_terminal():
        raise UsageError(f"name the PROFILE: imsa {command} PROFILE (with a terminal, imsa {command} alone lists "
                         "them to choose from)")
    names = config.profile_names()
    if not names:
        raise UsageError(f"no profiles in {config.config_path()} or ~/.aws/config; add one: imsa add PROFILE")
    active = None
    try:
        from imsa.client import Client

        active = ((client or Client()).status().get("active") or {}).get("profile")
    except ImsaError:
        pass  # no service: nothing is marked
    return pick(names, active)
