"""Loading a Bladed-style controller library and calling its DISCON entry point.

Shared by the discon-server's worker process (which calls it on wire frames,
in place) and by ``discon-check --library`` (which calls it the way OpenFAST's
ServoDyn does). Keeping one loader means a reply through a container and an
in-process call go through the very same ctypes signature.
"""

from __future__ import annotations

import ctypes
import os

from discon_manager.protocol import Header

#: DISCON(float *avrSWAP, int *aviFAIL, char *accINFILE, char *avcOUTNAME, char *avcMSG)
DISCON_ARGTYPES = [
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
]

#: Records a controller may read whatever nSwap says (Bladed's fixed block plus
#: logging): frames shorter than this are padded so a controller never reads
#: past the buffer it was handed.
MIN_SWAP_RECORDS = 165


def _show(text: str) -> str:
    """Quote a client-supplied name for a message: control characters escaped, cut short."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:80])
    return f"'{shown}'" + ("..." if len(text) > 80 else "")


class ControllerLoadError(RuntimeError):
    """The library or its entry point cannot be loaded; the text says what to do."""


def exported_functions(path: str) -> list[str]:
    """Names of the functions a shared library exports (its ELF dynamic symbols)."""
    from elftools.elf.elffile import ELFFile  # only needed on the error path

    names: list[str] = []
    with open(path, "rb") as f:
        elf = ELFFile(f)
        section = elf.get_section_by_name(".dynsym")
        if section is None:
            return names
        for sym in section.iter_symbols():
            if (
                sym["st_info"]["type"] == "STT_FUNC"
                and sym["st_shndx"] != "SHN_UNDEF"
                and sym["st_info"]["bind"] in ("STB_GLOBAL", "STB_WEAK")
            ):
                names.append(sym.name)
    return sorted(set(names))


def entry_point_candidates(path: str) -> list[str]:
    """Exported functions that look like controller entry points (``*discon*`` first)."""
    try:
        names = exported_functions(path)
    except Exception:  # not an ELF file, unreadable: the caller reports the load error
        return []
    likely = [n for n in names if "discon" in n.lower()]
    return likely or names[:12]


class Controller:
    """A loaded controller library and its DISCON-shaped entry point."""

    def __init__(self, path: str, proc: str) -> None:
        if not os.path.exists(path):
            raise ControllerLoadError(
                f"controller library '{path}' does not exist; check the library path"
            )
        try:
            self.lib = ctypes.CDLL(os.path.abspath(path), mode=ctypes.RTLD_LOCAL)
        except OSError as e:
            raise ControllerLoadError(f"cannot load controller library '{path}': {e}") from e
        # Only a function the library itself exports: dlsym on its handle would also
        # find libc's (proc=system would run a shell command).
        try:
            own = exported_functions(path)
        except Exception as e:
            raise ControllerLoadError(
                f"controller library '{path}' is not a readable ELF shared library ({e})"
            ) from None
        try:
            if proc not in own:
                raise AttributeError(proc)
            fn = getattr(self.lib, proc)
        except (AttributeError, ValueError):
            found = entry_point_candidates(path)
            hint = f"; it exports {', '.join(found)}" if found else "; it exports no functions"
            raise ControllerLoadError(
                f"controller library '{path}' has no symbol {_show(proc)}{hint}"
            ) from None
        fn.argtypes = DISCON_ARGTYPES
        fn.restype = None
        self.fn = fn
        self.path = path
        self.proc = proc

    def call_frame(self, frame: bytearray, h: Header) -> None:
        """Call DISCON on a wire frame in place: the frame becomes its own reply.

        Swap, aviFAIL, outname and msg are handed to the controller as pointers
        into ``frame``, so the reply has the request's version and sizes by
        construction and nothing is copied on the way in or out.
        """
        buf = (ctypes.c_char * len(frame)).from_buffer(frame)
        base = ctypes.addressof(buf)
        swap_ptr = base + h.swap_offset
        padded = None
        if h.n_swap < MIN_SWAP_RECORDS:
            padded = (ctypes.c_float * MIN_SWAP_RECORDS)()
            ctypes.memmove(padded, swap_ptr, 4 * h.n_swap)
            swap_ptr = ctypes.addressof(padded)
        infile_ptr = base + h.infile_offset
        infile_copy = None
        if b"\0" not in frame[h.infile_offset : h.outname_offset]:
            # C and Fortran read accINFILE up to a NUL: give them one.
            infile_copy = ctypes.create_string_buffer(
                bytes(frame[h.infile_offset : h.outname_offset])
            )
            infile_ptr = ctypes.addressof(infile_copy)
        self.fn(
            swap_ptr,
            base + h.fail_offset,
            infile_ptr,
            base + h.outname_offset,
            base + h.msg_offset,
        )
        if padded is not None:
            ctypes.memmove(base + h.swap_offset, padded, 4 * h.n_swap)
        del buf
