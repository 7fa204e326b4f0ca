"""
CIDEr-D (Vedantam et al. 2015) as the COCO caption evaluation (tylin/coco-caption) computes it, with
a Python stand-in for its Java PTB tokenizer. Standard library only, so it can be copied alone.

    from cider import score
    # {image id: caption}, {image id: [reference captions]} -> CIDEr-D x 100
    score(candidates, references)
"""

import math
import re
from collections import Counter

# The COCO evaluation runs Stanford's PTBTokenizer (Java) with -lowerCase, then drops these tokens.
# Its list also names -LRB- etc., but they are lower-cased first and never match: brackets survive.
PUNCTUATION = {"''", "'", "``", "`", '.', '?', '!', ',', ':', '-', '--', '...', ';'}
BRACKETS = {'(': '-lrb-', ')': '-rrb-', '[': '-lsb-', ']': '-rsb-', '{': '-lcb-', '}': '-rcb-'}
SPLIT_WORDS = {'cannot': 'can not', 'gonna': 'gon na', 'wanna': 'wan na', 'gotta': 'got ta',
               'gimme': 'gim me', 'lemme': 'lem me'}
SPLIT_WORDS_RE = re.compile(r'\b(%s)\b' % '|'.join(SPLIT_WORDS))
# "don't" -> "do n't", "man's" -> "man 's"
CLITICS = re.compile(r"(\w)(n't|'s|'re|'ll|'ve|'m|'d)(?!\w)")
ABBREVIATIONS = ('mr|mrs|ms|dr|prof|st|jr|sr|vs|etc|inc|co|corp|ltd|ave|mt|ft|jan|feb|mar|apr|'
                 'jun|jul|aug|sep|sept|oct|nov|dec')
PTB_TOKEN = re.compile(r"""
    (?:[a-z]\.)+(?!\w)                      # initials and acronyms keep their dots: u.s.
  | (?:%s)\.(?!\w)                          # common abbreviations keep their period
  | '(?:s|re|ll|ve|m|d|em|cause|\d\ds)(?!\w) # clitics split off above; 'em 'cause '90s
  | no\.(?=\s+\d)                           # "no. 5"
  | (?:[-+]?\.?(?=\d))?                      # sign or leading point of a number
    \w+(?:(?:[-./']|(?<=\d)[,:](?=\d))\w+)*   # a word; inner - . / ' and 1,000 or 10:30 stay
  | \.+ | -+ | [!?]+                        # runs of punctuation (PTB keeps "!!" and "?!" whole)
  | \S                                      # any other symbol alone
""" % ABBREVIATIONS, re.VERBOSE)


def ptb_tokenize(text: str) -> str:
    """A Python stand-in for the COCO evaluation's tokenization: PTB rules, lower case, punctuation
    dropped."""
    text = text.lower().replace('\u2018', "'").replace('\u2019', "'")
    text = re.sub('[\u201c\u201d]', '"', text)
    text = re.sub('[\u2013\u2014]', ' -- ', text)  # PTB turns en and em dashes into "--"
    text = CLITICS.sub(r'\1 \2', SPLIT_WORDS_RE.sub(lambda m: SPLIT_WORDS[m.group(1)], text))
    kept = []
    for token in (BRACKETS.get(t, t) for t in PTB_TOKEN.findall(text)):
        if token == '"' or set(token) == {'.'} or token in PUNCTUATION:
            continue  # PTB turns " into `` or '' and dot runs into "...": all dropped
        if set(token) == {'-'} and len(token) <= 4:
            continue  # 2-4 hyphens become "--" (dropped); 5 or more stay
        kept.append(token)
    return ' '.join(kept)


def ngrams(sentence: str, n: int = 4) -> Counter:
    words = sentence.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1)
                   for i in range(len(words) - k + 1))


def cider_d(references: dict, candidates: dict, n: int = 4,
            sigma: float = 6.0) -> tuple[float, dict]:
    """CIDEr-D of tokenized candidates against tokenized references: (mean, per-image scores).

    Per n-gram order: tf-idf vectors (tf = raw count; df = number of images whose references hold
    the n-gram; idf = log(#images) - log(max(1, df))); similarity = sum of min(hyp, ref) * ref
    (the clipping that makes it "-D") over the norms, times exp(-(len_hyp - len_ref)^2 / (2
    sigma^2)) with len = number of bigrams; mean over orders, then over references, times 10.
    """
    missing = [k for k in references if k not in candidates][:5]
    if missing or len(candidates) != len(references):
        raise ValueError(f"candidates and references cover different images (e.g. {missing})")
    if any(not refs for refs in references.values()):
        raise ValueError("every image needs at least one reference caption")
    ref_counts = {k: [ngrams(r, n) for r in refs] for k, refs in references.items()}
    doc_freq = Counter(g for counts in ref_counts.values() for g in set().union(*counts))
    log_images = math.log(len(references))

    def vectors(counts):
        vec = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, doc_freq[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        return vec, norms, sum(tf for gram, tf in counts.items() if len(gram) == 2)

    scores = {}
    for key, counts in ref_counts.items():
        hyp, hyp_norm, hyp_len = vectors(ngrams(candidates[key], n))
        total = 0.0
        for ref_c in counts:
            ref, ref_norm, ref_len = vectors(ref_c)
            penalty = math.exp(-(hyp_len - ref_len) ** 2 / (2 * sigma ** 2))
            for k in range(n):
                dot = sum(min(w, ref[k].get(g, 0.0)) * ref[k].get(g, 0.0)
                          for g, w in hyp[k].items())
                if hyp_norm[k] and ref_norm[k]:
                    total += penalty * dot / (hyp_norm[k] * ref_norm[k])
        scores[key] = 10.0 * total / n / len(counts)
    return sum(scores.values()) / len(scores), scores


def score(candidates: dict, references: dict) -> float:
    """CIDEr-D x 100 of {image_id: caption} against {image_id: [captions]}."""
    unknown = [k for k in candidates if k not in references][:5]
    if unknown:
        raise ValueError(f"results name images that are not in the annotations (e.g. {unknown})")
    refs = {k: [ptb_tokenize(r) for r in references[k]] for k in candidates}
    return 100 * cider_d(refs, {k: ptb_tokenize(c) for k, c in candidates.items()})[0]
