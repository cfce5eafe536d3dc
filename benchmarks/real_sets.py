"""Fetch real sound recordings from Debian packages as class-per-folder sets for copy detection.

Sets (each written to ``OUT/<set>/<class>/<file>`` with ``OUT/<set>/sources.json``):

* ``drums`` -- one-shot drum samples of the kits in ``hydrogen-drumkits``, classed by instrument
  (from each kit's ``drumkit.xml`` instrument names, else the file name). All velocity layers of an
  instrument stay together: real libraries hold such near-duplicates.
* ``foley`` -- short game sound effects (weapons, magic, creatures, city noises, interface) from
  the Wesnoth data package and ``lincity-ng-data``; no music, no speech, nothing over 30 s.

Nothing here is committed: the packages are fetched at run time with ``apt-get download`` into
``OUT/_debs``, unpacked with ``dpkg-deb -x`` into ``OUT/_pkgs`` (both skipped when present) and
the original files are copied unchanged (original formats). ``sources.json`` records each
package's name, version and licence and each file's path inside its package and its class.

Run: ``python benchmarks/real_sets.py --out benchmarks/.cache/real_sets [--sets drums,foley]``.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3", ".opus"}
MAX_SECONDS = 30.0
MIN_SECONDS = 0.01
MIN_PER_CLASS = 20

# (class, pattern searched in the lower-case instrument name, then the file name); first match wins.
DRUM_CLASSES = [
    ("percussion", r"cowbell|conga|bongo|djemb|cajon|tamb|agogo|clave|woodblock|maraca|shake|"
                   r"triangle|sangban|dununba|kenkeni|waterglass|guiro|cabasa|timbal|trimo|mc_cb|cb\d*_"),
    ("hihat", r"hat|\bhh|ohh|chh"),
    ("cymbal", r"crash|ride|china|splash|cymbal|\bcym|^cc_|^cra_|^rd\d*_|bell"),
    ("clap", r"clap|snap"),
    ("kick", r"kick|bass ?drum|^bd|\bbd\b|_k_|^k_"),
    ("snare", r"snare|rim|stick|^sn|^sd|_sn_|^rs_|\bsd\b"),
    ("tom", r"tom|^t\d_|^tm"),
]

WESNOTH_CLASSES = [
    ("nature", r"^(birds|morning|night|campfire)"),
    ("creature", r"-(hit|die|growl|shriek|laugh)\b|^(hiss|groan|ugg|wail|zombie|wolf|wose)"),
    ("ranged", r"bow|sling|throw|dart|thunderstick|dragonstick|gunshot|^net|^ink|mud-glob"),
    ("magic", r"magic|lightning|flame|fire|heal|slowed|poison|petrified|entangle|water-blast|"
              r"mud-fist"),
    ("melee", r"sword|axe|club|mace|flail|dagger|knife|spear|staff|hatchet|fist|claws|bite|pincers|"
              r"tail|torch|^miss|squishy|charge|attack"),
    ("ui", r"^(gold|open-chest|potion)$"),
]
LINCITY_CLASSES = [
    ("ui", r"^(click|window)"),
    ("city", r"residential|shanty|commune|market|school|university|health|firestation|monument\d|"
             r"sports"),
    ("traffic", r"trafic|rail|dirttrack|harbor|rocket|parklandplane"),
    ("nature", r"green|water|parklandlake|farm|^fire"),
    ("industry", r"blacksmith|mine|mill|pottery|industry|recycle|tip|power|substation|build|raze|"
                 r"construction"),
]

# package (a trailing * picks the newest matching name), {folder inside it: class of files no
# pattern matches}, class patterns, pattern of paths to leave out.
FOLEY_SOURCES = [
    ("wesnoth-1.*-data", {"usr/share/games/wesnoth/*/data/core/sounds": "other",
                          "usr/share/games/wesnoth/*/sounds": "ui"},
     WESNOTH_CLASSES, r"horn-signals|fanfare|wardrums|music"),
    ("lincity-ng-data", {"usr/share/games/lincity-ng/sounds": "other"}, LINCITY_CLASSES, r"music"),
]
DRUM_PACKAGE = "hydrogen-drumkits"
DRUM_SKIP = r"emptysample"  # silent placeholders in two kits


def die(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except OSError as exc:
        die(f"{' '.join(cmd)}: {exc}")
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no message"])[-1]
        die(f"{' '.join(cmd)} failed ({res.returncode}): {last}")
    return res.stdout


def resolve(name: str) -> str:
    """``wesnoth-1.*-data`` -> the newest such package apt knows; other names are returned as is."""
    if "*" not in name:
        return name
    prefix = name.split("*")[0]
    pattern = re.compile(re.escape(name).replace(r"\*", r"[0-9.]+") + "$")
    found = [n for n in run(["apt-cache", "pkgnames", prefix]).split() if pattern.match(n)]
    if not found:
        die(f"no package matching {name} (run apt-get update?)")
    return max(found, key=lambda n: [int(x) for x in re.findall(r"\d+", n)])


def fetch(pkg: str, cache: Path) -> dict:
    """Download and unpack ``pkg`` once; return its name, version, size, licence and root folder."""
    debs, pkgs = cache / "_debs", cache / "_pkgs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{pkg}_*.deb"))
    if not found:
        print(f"downloading {pkg} ...", flush=True)
        run(["apt-get", "download", pkg], cwd=debs)
        found = sorted(debs.glob(f"{pkg}_*.deb"))
        if not found:
            die(f"apt-get download {pkg} left no .deb in {debs}")
    deb = found[-1]
    root = pkgs / pkg
    if not (root / ".unpacked").exists():
        print(f"unpacking {deb.name} ...", flush=True)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        run(["dpkg-deb", "-x", str(deb), str(root)])
        (root / ".unpacked").touch()
    version = run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
    copyright_path = f"usr/share/doc/{pkg}/copyright"
    text = (root / copyright_path).read_text(errors="replace") if (root / copyright_path).exists() else ""
    licences = [m.strip() for m in re.findall(r"^License:(.*)$", text, re.M)]
    if licences and not any(licences):  # free-form file: the text under "License:"
        lines = [s.strip() for s in text.split("\nLicense:", 1)[1].splitlines() if s.strip()]
        licences = [" ".join(lines[:6])]
    licences = list(dict.fromkeys(s for s in licences if s))
    return {"package": pkg, "version": version, "deb": deb.name, "deb_bytes": deb.stat().st_size,
            "copyright": copyright_path, "licence": licences,
            "copyright_head": text.splitlines()[:12], "root": root}


def classify(text: str, table: list[tuple[str, str]]) -> str | None:
    for name, pattern in table:
        if re.search(pattern, text):
            return name
    return None


def drum_items(info: dict) -> list[dict]:
    """One item per sample file of every kit; ``group`` ties together an instrument's layers."""
    items = []
    for xml in sorted(info["root"].glob("usr/share/hydrogen/data/drumkits/*/drumkit.xml")):
        kit_dir = xml.parent
        kit = re.sub(r"[^A-Za-z0-9]+", "_", kit_dir.name).strip("_")
        tree = ET.parse(xml).getroot()
        strip = lambda t: t.split("}")[-1]  # noqa: E731  (some kits use an XML namespace)
        kit_licence = next((e.text for e in tree.iter() if strip(e.tag) == "license"), None)
        instrument_of = {}
        for inst in (e for e in tree.iter() if strip(e.tag) == "instrument"):
            name = next((c.text or "" for c in inst if strip(c.tag) == "name"), "")
            for e in inst.iter():
                if strip(e.tag) == "filename" and e.text:
                    instrument_of[e.text.strip()] = name.strip()
        for path in sorted(p for p in kit_dir.iterdir() if p.suffix.lower() in AUDIO_EXTS
                           and not re.search(DRUM_SKIP, p.name.lower())):
            inst = instrument_of.get(path.name, "")
            cls = classify(inst.lower(), DRUM_CLASSES) or classify(path.stem.lower(), DRUM_CLASSES)
            items.append({"src": path, "name": f"{kit}__{path.name}", "class": cls or "other",
                          "group": (kit, inst or re.sub(r"[\d_\-]+$", "", path.stem)),
                          "instrument": inst or None, "kit_licence": kit_licence})
    return items


def foley_items(info: dict, folders: dict[str, str], table: list, skip: str) -> list[dict]:
    items, short = [], info["package"].split("-")[0]
    for pattern, default in folders.items():
        for folder in sorted(info["root"].glob(pattern)):
            for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTS):
                rel = path.relative_to(folder).as_posix()
                if re.search(skip, rel.lower()):
                    continue
                stem = re.sub(r"(-miss)?(-\d+)?$", "", path.stem.lower())
                items.append({"src": path, "name": f"{short}__{rel.replace('/', '__')}",
                              "class": classify(stem, table) or default, "group": (short, path.stem)})
    return items


def subsample(items: list[dict], cap: int) -> list[dict]:
    """Every k-th instrument group (sorted) so that at most about ``cap`` files remain."""
    if len(items) <= cap:
        return items
    groups = defaultdict(list)
    for it in items:
        groups[it["group"]].append(it)
    k = math.ceil(len(items) / cap)
    return [it for i, g in enumerate(sorted(groups)) if i % k == 0 for it in groups[g]]


def build_set(name: str, items: list[dict], packages: list[dict], out: Path) -> dict:
    """Probe, merge small classes into "other", copy into ``out/name`` and write sources.json."""
    kept, skipped = [], []
    for it in items:
        try:
            info = sf.info(str(it["src"]))
        except Exception as exc:  # noqa: BLE001 (libsndfile raises several kinds)
            skipped.append({**it, "reason": f"unreadable: {type(exc).__name__}"})
            continue
        if not MIN_SECONDS <= info.duration <= MAX_SECONDS:
            skipped.append({**it, "reason": f"outside {MIN_SECONDS:g}-{MAX_SECONDS:g} s "
                                            f"({info.duration:.2f} s)"})
            continue
        kept.append({**it, "duration": round(info.duration, 3), "samplerate": info.samplerate,
                     "channels": info.channels})
    sizes = Counter(it["class"] for it in kept)
    for it in kept:
        if sizes[it["class"]] < MIN_PER_CLASS:
            it["class"] = "other"
    dest = out / name
    wanted = set()
    for it in kept:
        target = dest / it["class"] / it["name"]
        wanted.add(target)
        if not target.exists() or target.stat().st_size != it["src"].stat().st_size:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(it["src"], target)
    for old in [p for p in dest.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTS]:
        if old not in wanted:
            old.unlink()
    for d in sorted((p for p in dest.glob("*") if p.is_dir()), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()

    def record(it: dict) -> dict:
        pkg_root = next(p["root"] for p in packages if it["src"].is_relative_to(p["root"]))
        rec = {"package": pkg_root.name, "source_path": it["src"].relative_to(pkg_root).as_posix(),
               "class": it["class"]}
        rec.update({k: it[k] for k in ("instrument", "kit_licence", "duration", "samplerate",
                                       "channels", "reason") if k in it})
        return rec

    manifest = {
        "set": name,
        "note": "Fetched at run time by benchmarks/real_sets.py; not committed.",
        "packages": [{k: v for k, v in p.items() if k != "root"} for p in packages],
        "files": {f"{it['class']}/{it['name']}": record(it) for it in kept},
        "skipped": [record(it) for it in skipped],
    }
    (dest / "sources.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return {"kept": kept, "skipped": skipped}


def report(name: str, packages: list[dict], result: dict) -> None:
    kept, skipped = result["kept"], result["skipped"]
    for p in packages:
        licence = "; ".join(p["licence"]) or "see " + p["copyright"]
        print(f"\n[{name}] {p['package']} {p['version']} ({p['deb_bytes'] / 1e6:.1f} MB)  "
              f"licence: {licence[:120]}")
    print(f"{'class':<12}{'files':>7}{'seconds':>10}  formats")
    by_class = defaultdict(list)
    for it in kept:
        by_class[it["class"]].append(it)
    for cls in sorted(by_class):
        its = by_class[cls]
        exts = Counter(it["src"].suffix.lower().lstrip(".") for it in its)
        print(f"{cls:<12}{len(its):>7}{sum(i['duration'] for i in its):>10.1f}  "
              + " ".join(f"{e}:{n}" for e, n in sorted(exts.items())))
    exts = Counter(it["src"].suffix.lower().lstrip(".") for it in kept)
    print(f"{'total':<12}{len(kept):>7}{sum(i['duration'] for i in kept):>10.1f}  "
          + " ".join(f"{e}:{n}" for e, n in sorted(exts.items())))
    for reason, n in Counter(s["reason"].split(" (")[0] for s in skipped).items():
        print(f"skipped {n} file(s): {reason}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/.cache/real_sets")
    ap.add_argument("--sets", default="drums,foley", help="comma-separated: drums, foley")
    ap.add_argument("--max-files", type=int, default=1500, help="cap per set (whole instruments)")
    args = ap.parse_args()
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if unknown := set(sets) - {"drums", "foley"}:
        die(f"unknown set(s): {', '.join(sorted(unknown))} (choose from drums, foley)")
    start = time.time()
    for name in sets:
        if name == "drums":
            packages = [fetch(DRUM_PACKAGE, args.out)]
            items = drum_items(packages[0])
        else:
            packages, items = [], []
            for pkg, folders, table, skip in FOLEY_SOURCES:
                packages.append(fetch(resolve(pkg), args.out))
                items += foley_items(packages[-1], folders, table, skip)
        report(name, packages, build_set(name, subsample(items, args.max_files), packages, args.out))
    print(f"\ndone in {time.time() - start:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
