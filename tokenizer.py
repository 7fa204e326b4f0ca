"""
Train a SentencePiece BPE vocabulary on COCO-format captions, and encode/decode captions with it.

    python tokenizer.py --captions=data/coco/annotations/captions_train2017.json \
        --vocab_size=10000 \
        --out=data/coco/coco_10k

writes PREFIX.model and PREFIX.vocab. As in the paper: BPE, character coverage 1.0, captions
lower-cased and stripped of accents both when training and when encoding. Ids 0-3 are fixed:
<unk> = 0 (also used as padding), [SOS] = 1, [EOS] = 2, [MASK] = 3.

    from tokenizer import Tokenizer
    tok = Tokenizer('data/coco/coco_10k.model')
    ids = tok.encode('A Café on the LEFT')     # pieces only; callers add [SOS] / [EOS]
    tok.decode(ids)                            # 'a cafe on the left'

(The file is not called tokenize.py: that name would shadow the standard-library module
`tokenize`, which `import torch` needs, for every script in this folder.)
Imports only the standard library and sentencepiece, so it can be copied alone. Errors are
ValueError / OSError naming the file; the command line prints them as one line.
"""

import hashlib
import json
import os
import re
import unicodedata

import sentencepiece as spm

PAD_ID, SOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3
SPECIAL_PIECES = {SOS_ID: '[SOS]', EOS_ID: '[EOS]', MASK_ID: '[MASK]'}


def normalize(text: str) -> str:
    """Lower-case and strip accents (NFKD, then drop combining marks): 'Café' -> 'cafe'."""
    text = unicodedata.normalize('NFKD', text.lower())
    return ''.join(c for c in text if not unicodedata.combining(c)).strip()


class Tokenizer:
    """A trained SentencePiece model plus the project's normalization and special ids.

    Picklable (it carries the serialized model, not a file handle), so DataLoader workers
    can each hold one.
    """

    def __init__(self, model_path: str):
        self.model_path = str(model_path)
        try:
            with open(self.model_path, 'rb') as f:
                proto = f.read()
        except OSError as e:
            raise OSError(f"tokenizer {self.model_path}: {e.strerror}") from None
        self._load(proto)

    def _load(self, proto: bytes) -> None:
        self.proto = proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError):
            raise ValueError(f"tokenizer {self.model_path}: not a SentencePiece model") from None
        for i, piece in SPECIAL_PIECES.items():
            if self.sp.piece_to_id(piece) != i:
                raise ValueError(f"tokenizer {self.model_path}: expected {piece} at id {i} "
                                 f"(train it with tokenizer.py)")

    def __getstate__(self):
        return {'model_path': self.model_path, 'proto': self.proto}

    def __setstate__(self, state):
        self.model_path = state['model_path']
        self._load(state['proto'])

    pad_id, sos_id, eos_id, mask_id = PAD_ID, SOS_ID, EOS_ID, MASK_ID

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(normalize(text), out_type=int)

    def decode(self, ids) -> str:
        # special ids (padding, [SOS], [EOS], [MASK]) are dropped, not printed
        return self.sp.decode([int(i) for i in ids if int(i) > MASK_ID])

    def pieces_hash(self) -> str:
        """A hash of the pieces in id order: two vocabularies with it equal give every id the same
        piece."""
        pieces = '\n'.join(self.sp.id_to_piece(i) for i in range(len(self)))
        return hashlib.sha256(pieces.encode()).hexdigest()


def read_coco_captions(path: str) -> tuple[dict[int, str], dict[int, list[str]]]:
    """A COCO captions JSON file as ({image id: file name}, {image id: its captions}), every caption
    checked to be text with a word in it, so a bad one stops a run at start-up, not when its image
    is first drawn.
    ValueError / OSError naming the file if it is unusable. (coco.py reads its splits with it.)"""
    try:
        with open(path) as f:
            data = json.load(f)
        # the tokenizer needs none
        files = {image['id']: image['file_name'] for image in data.get('images', [])}
        captions = {}
        for a in data['annotations']:
            caption = a['caption']
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"{path}: annotation {a.get('id')} of image {a['image_id']} has "
                                 f"the caption {caption!r}: not text with words")
            captions.setdefault(a['image_id'], []).append(caption)
    except OSError as e:
        raise OSError(f"{path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a COCO captions file ({type(e).__name__}: {e})") from None
    if not captions:
        raise ValueError(f"{path}: no captions in 'annotations'")
    return files, captions


def train(captions: list[str], vocab_size: int, out_prefix: str) -> None:
    """Train the BPE model and write out_prefix.model / .vocab atomically (temp names, then
    rename)."""
    tmp_prefix = f"{out_prefix}.tmp{os.getpid()}"
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([normalize(c) for c in captions]),
            model_prefix=tmp_prefix, model_type='bpe', vocab_size=vocab_size,
            character_coverage=1.0,  # keep every character seen; COCO is almost all ASCII anyway
            unk_id=PAD_ID, bos_id=-1, eos_id=-1, pad_id=-1,  # <unk> doubles as padding, as upstream
            control_symbols=[SPECIAL_PIECES[i] for i in sorted(SPECIAL_PIECES)],
            input_sentence_size=2_000_000, shuffle_input_sentence=True, minloglevel=2)
    except RuntimeError as e:
        for suffix in ('.model', '.vocab'):
            if os.path.exists(tmp_prefix + suffix):
                os.remove(tmp_prefix + suffix)
        # sentencepiece says "Vocabulary size is too high (N). Please set it to a value <= M."
        largest = re.search(r'<= (\d+)', str(e))
        if largest:
            raise ValueError(f"--vocab_size={vocab_size} is too large for these captions; "
                             f"the largest that works is {largest.group(1)}") from None
        # ... or "smaller than required_chars. N vs M", with advice for a flag of its own
        smallest = re.search(r'required_chars\. \d+ vs (\d+)', str(e))
        if smallest:
            raise ValueError(f"--vocab_size={vocab_size} is too small for these captions: each of "
                             "their characters is a piece (character coverage 1.0, the paper's); "
                             f"the smallest that works is {smallest.group(1)}") from None
        raise ValueError(f"sentencepiece failed: {str(e).strip().splitlines()[-1]}") from None
    try:  # sentencepiece does not say when a write fails (a full disk): check, then replace
        with open(tmp_prefix + '.vocab', encoding='utf-8') as f:
            lines = sum(1 for _ in f)
        if len(Tokenizer(tmp_prefix + '.model')) != vocab_size or lines != vocab_size:
            raise ValueError
    except (OSError, ValueError, UnicodeDecodeError):
        for suffix in ('.model', '.vocab'):
            if os.path.exists(tmp_prefix + suffix):
                os.remove(tmp_prefix + suffix)
        raise OSError(f"{out_prefix}.model: cannot write (sentencepiece wrote a cut file: a full "
                      "disk?); the previous files stay as they were") from None
    for suffix in ('.vocab', '.model'):  # .model last: its presence marks a complete vocabulary
        os.replace(tmp_prefix + suffix, out_prefix + suffix)


# ----------------------------------------------------------------------------------------------
# the command line (configurator.py's flags, imported only when it runs)
captions = ''                 # a COCO captions JSON file (captions_train2017.json)
vocab_size = 10000            # the paper's
out = ''                      # the prefix: writes PREFIX.model and PREFIX.vocab
overwrite = False             # True: replace PREFIX.model (its checkpoints then refuse it)
# ----------------------------------------------------------------------------------------------


def main() -> None:
    from safety import check_outputs
    if not captions or not out:
        raise SystemExit("error: give --captions=FILE (COCO captions JSON) and --out=PREFIX")
    try:
        check_outputs({'out': [out + '.model', out + '.vocab']}, {'--captions': captions})
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if out.endswith(os.sep) or os.path.isdir(out):
        raise SystemExit(f"error: --out={out} is a folder: give the files' prefix, e.g. "
                         f"{os.path.join(out, 'vocab')}")
    for path in (out + '.model', out + '.vocab'):
        if os.path.isdir(path):
            raise SystemExit(f"error: --out={out}: {path} is a folder")
    if os.path.exists(out + '.model') and not overwrite:
        raise SystemExit(f"error: {out}.model exists, and the checkpoints trained with it "
                         "name it by path: write elsewhere with --out, or replace it with "
                         "--overwrite=True")
    if vocab_size <= len(SPECIAL_PIECES) + 1:
        raise SystemExit(f"error: --vocab_size={vocab_size} must be larger than "
                         f"{len(SPECIAL_PIECES) + 1}")
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise SystemExit(f"error: --out={out}: folder {out_dir} does not exist or is not "
                         "writable")
    try:
        texts = [c for image_captions in read_coco_captions(captions)[1].values()
                 for c in image_captions]
        print(f"training a {vocab_size}-piece BPE vocabulary on {len(texts):,} captions "
              f"from {captions}")
        train(texts, vocab_size, out)
        tok = Tokenizer(out + '.model')
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    example = texts[0]
    print(f"example: {example!r} -> {[tok.sp.id_to_piece(i) for i in tok.encode(example)]}")
    print(f"wrote {out}.model and {out}.vocab ({len(tok)} pieces)")


if __name__ == '__main__':
    from configurator import configure
    configure(globals())
    main()
