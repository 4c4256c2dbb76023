"""Real recorded audio for benchmarks/learning.py: Debian's game soundtracks and a sampled-instrument
soundfont, fetched as `apt-get download` fetches them, and the probe tasks built from them.

- **Corpus**: the music of five Debian packages (Colobot, Drascula, Warzone 2100, Frets on Fire's two song
  packs, ASC). A few whole tracks of each of four games are held out for the `soundtrack` probe; the rest
  is the pretraining corpus (about 2.5 hours).
- **Probe tasks**, written as CSVs of `path,label,group` so the probe never trains and tests on clips of one
  recording (or one instrument):
  - `instrument`: single notes of 88 General MIDI instruments (Fluid R3 soundfont, rendered by fluidsynth),
    labelled by the 11 instrument families; group = the instrument, so test instruments are unseen ones;
  - `pitch`: notes of the same instruments labelled by pitch class (C..B over three octaves); group = the
    instrument;
  - `soundtrack`: 10 s clips of the held-out tracks labelled by game; group = the track.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 24000
PACKAGES = {  # package -> (probe class or None, glob of its music files)
    "colobot-common-sounds": ("colobot", "usr/share/games/colobot/music/*.ogg"),
    "drascula-music": ("drascula", "usr/share/scummvm/drascula/audio/*.ogg"),
    "warzone2100-music": ("warzone2100", "usr/share/games/warzone2100/music/**/*.opus"),
    "fretsonfire-songs-muldjord": ("fretsonfire", "usr/share/games/fretsonfire/data/songs/*/*/song.ogg"),
    "fretsonfire-songs-sectoid": ("fretsonfire", "usr/share/games/fretsonfire/data/songs/*/*/song.ogg"),
    "asc-music": (None, "usr/share/games/asc/music/*.mp3"),
}
SOUNDFONT = ("fluid-soundfont-gm", "usr/share/sounds/sf2/FluidR3_GM.sf2")
HELD_OUT = 0.25  # of each game's tracks (at least 30 s long), for the soundtrack probe
WARZONE_MINUTES = 40.0  # Warzone 2100 ships 4 hours; the corpus takes this much of it
FAMILIES = [
    "piano", "chromatic percussion", "organ", "guitar", "bass", "strings",
    "ensemble", "brass", "reed", "pipe", "synth lead",
]  # fmt: skip
PITCHES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]


def download(packages: list[str], debs: Path) -> list[Path]:
    """`apt-get download` each package not yet in DEBS (Debian's own client and mirrors) and return the
    .deb files; says what it fetches."""
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        if not shutil.which("apt-get"):
            raise SystemExit(f"apt-get is needed to fetch {', '.join(missing)} (a Debian or Ubuntu machine)")
        print(f"downloading with apt-get download into {debs}: {', '.join(missing)}", flush=True)
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True, stdout=subprocess.DEVNULL)
    return [next(debs.glob(f"{p}_*.deb")) for p in packages]


def extract(deb: Path, into: Path) -> Path:
    """The package's files under INTO/PACKAGE (dpkg-deb -x, once)."""
    target = into / deb.name.split("_", 1)[0]
    if not (target / ".done").exists():
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
        (target / ".done").touch()
    return target


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)


def build_corpus(root: Path) -> dict[str, object]:
    """ROOT/corpus/GAME/... (pretraining) and ROOT/probes/soundtrack.csv (held-out tracks, 10 s clips)."""
    packages = extract_all(root)
    corpus, clips = root / "corpus", root / "probes" / "soundtrack"
    tracks: dict[str, list[Path]] = {}
    for package, (game, pattern) in PACKAGES.items():
        files = sorted(p for p in packages[package].glob(pattern) if p.is_file() and not p.is_symlink())
        tracks.setdefault(game or package, []).extend(files)
    rows, pretrain_seconds, held = [], 0.0, {}
    for game, files in sorted(tracks.items()):
        durations = {f: sf.info(str(f)).duration for f in files}
        long = [f for f in files if durations[f] >= 30.0]
        n_held = max(3, round(HELD_OUT * len(long))) if game in {g for g, _ in PACKAGES.values()} else 0
        step = len(long) / max(n_held, 1)
        held_out = [long[int(i * step)] for i in range(n_held)]  # spread over the (sorted) list
        held[game] = [f.name if f.name != "song.ogg" else f.parent.name for f in held_out]
        budget = WARZONE_MINUTES * 60 if game == "warzone2100" else math.inf
        for f in files:
            if f in held_out or durations[f] > budget:
                continue
            budget -= durations[f]
            pretrain_seconds += durations[f]
            _place(f, corpus / game / f"{f.parent.name}-{f.name}")
        per_track = math.ceil(48 / max(n_held, 1))
        for f in held_out:
            audio = _read_mono(f)
            starts = np.linspace(0, len(audio) - 10 * RATE, per_track).astype(int)
            for i, start in enumerate(starts):
                path = clips / game / f"{f.parent.name}-{f.stem}-{i:02d}.flac"
                _write(path, audio[start : start + 10 * RATE])
                rows.append(
                    (path.relative_to(root / "probes").as_posix(), game, f"{game}/{f.parent.name}/{f.stem}")
                )
    _write_csv(root / "probes" / "soundtrack.csv", rows)
    return {"pretrain_minutes": round(pretrain_seconds / 60, 1), "held_out_tracks": held, "clips": len(rows)}


def extract_all(root: Path) -> dict[str, Path]:
    names = [*PACKAGES, SOUNDFONT[0]]
    return {
        deb.name.split("_", 1)[0]: extract(deb, root / "packages") for deb in download(names, root / "debs")
    }


def _read_mono(path: Path) -> np.ndarray:
    from mert_pipeline.embed import read_audio

    return read_audio(path)  # 24 kHz mono float32, the probe's own reader


def _write(path: Path, audio: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        sf.write(str(path), audio, RATE, subtype="PCM_16")


def _write_csv(path: Path, rows: list[tuple[str, str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group"])
        writer.writerows(rows)


def _midi(notes: list[tuple[int, int, float, float]], program: int) -> bytes:
    """A one-track Standard MIDI File: program change, then (pitch, velocity, start s, length s) notes at
    120 bpm, 480 ticks a beat (so 960 ticks a second)."""
    events: list[tuple[int, bytes]] = [(0, bytes([0xC0, program]))]
    for pitch, velocity, start, length in notes:
        events.append((round(start * 960), bytes([0x90, pitch, velocity])))
        events.append((round((start + length) * 960), bytes([0x80, pitch, 0])))
    events.sort(key=lambda e: e[0])
    track, now = bytearray(), 0
    for tick, data in events:
        delta, now = tick - now, tick
        var = [delta & 0x7F]
        while delta > 0x7F:
            delta >>= 7
            var.insert(0, (delta & 0x7F) | 0x80)
        track += bytes(var) + data
    track += b"\x00\xff\x2f\x00"
    return (
        b"MThd" + struct.pack(">IHHH", 6, 0, 1, 480) + b"MTrk" + struct.pack(">I", len(track)) + bytes(track)
    )


def render_notes(font: Path, program: int, notes: list[tuple[int, int]], work: Path) -> list[np.ndarray]:
    """Each (pitch, velocity) as a 2 s clip of General MIDI PROGRAM through the soundfont (1.5 s held,
    no reverb or chorus), rendered by fluidsynth in one pass, 3 s apart."""
    if not shutil.which("fluidsynth"):
        raise SystemExit("fluidsynth is needed to render the probe notes: apt-get install fluidsynth")
    spacing = 3.0
    mid, wav = work / f"program{program}.mid", work / f"program{program}.wav"
    mid.write_bytes(_midi([(p, v, i * spacing, 1.5) for i, (p, v) in enumerate(notes)], program))
    subprocess.run(
        ["fluidsynth", "-ni", "-q", "-R", "0", "-C", "0", "-g", "0.6", "-r", str(RATE), "-F", str(wav),
         str(font), str(mid)],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    audio, rate = sf.read(str(wav), dtype="float32", always_2d=True)
    assert rate == RATE, rate
    mono = audio.mean(1)
    return [mono[int(i * spacing * RATE) : int((i * spacing + 2.0) * RATE)] for i in range(len(notes))]


def build_note_probes(root: Path, seed: int = 0) -> dict[str, int]:
    """ROOT/probes/instrument.csv (11 families x 8 instruments x 6 notes) and ROOT/probes/pitch.csv (12
    pitch classes x 44 notes over the same 88 instruments), clips under ROOT/probes/notes/."""
    done = [root / "probes" / f"{task}.csv" for task in ("instrument", "pitch")]
    if all(p.exists() for p in done):  # written last, after every clip
        return {p.stem: sum(1 for _ in p.open()) - 1 for p in done}
    packages = extract_all(root)
    font = packages[SOUNDFONT[0]] / SOUNDFONT[1]
    rng = np.random.default_rng(seed)
    work = root / "probes" / "render"
    work.mkdir(parents=True, exist_ok=True)
    instrument, pitch = [], []
    programs = range(8 * len(FAMILIES))
    pitch_plan: dict[int, list[int]] = {p: [] for p in programs}  # program -> pitches of its pitch-task notes
    for c in range(12):
        for _ in range(44):
            pitch_plan[int(rng.integers(len(programs)))].append(48 + c + 12 * int(rng.integers(3)))
    for program in programs:
        family = FAMILIES[program // 8]
        low = 36 if family == "bass" else 48
        family_notes = [int(rng.integers(low, low + 36)) for _ in range(6)]
        notes = [(p, int(rng.integers(70, 115))) for p in family_notes + pitch_plan[program]]
        clips = render_notes(font, program, notes, work)
        for i, (clip, (p, _)) in enumerate(zip(clips, notes, strict=True)):
            path = root / "probes" / "notes" / f"p{program:03d}-{i:02d}-n{p}.flac"
            _write(path, clip)
            row = (
                path.relative_to(root / "probes").as_posix(),
                family if i < 6 else PITCHES[p % 12],
                f"program{program}",
            )
            (instrument if i < 6 else pitch).append(row)
    _write_csv(root / "probes" / "instrument.csv", instrument)
    _write_csv(root / "probes" / "pitch.csv", pitch)
    shutil.rmtree(work)  # the benchmark's own scratch files
    return {"instrument": len(instrument), "pitch": len(pitch)}
