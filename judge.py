"""
Judging captions against atomic events (paper 3.3.1, Appendix F): missing events (in the ground truth,
absent from the caption), incorrect events (in the ground truth, described wrongly) and hallucinated
events (in the caption, absent from the ground truth). Miss = missing / N, Hall = (incorrect +
hallucinated) / N, Total = Miss + Hall, with N the number of ground-truth atomic events; over a set of
captions the counts are summed before dividing (corpus level), as the released evaluation does.
"""
from collections import Counter


def rates(judgments):
    """Corpus-level Miss, Hall and Total of a list of judgments (dicts of counts)."""
    n = max(1, sum(j["events"] for j in judgments))
    miss = sum(j["missed"] for j in judgments) / n
    hall = sum(j["incorrect"] + j["hallucinated"] for j in judgments) / n
    return {"miss": miss, "hall": hall, "total": miss + hall}


# -----------------------------------------------------------------------------
# the exact judge of the toy world, where every caption sentence maps back to an event key


def toy_judge(caption_keys, event_keys):
    """Counts, with no LLM, for a toy caption parsed into event keys ([kind, *slots]; ["unknown", text]
    for a sentence no template makes) against the clip's known keys. A caption event equal to a
    ground-truth one matches it; a leftover caption event of the same kind as a leftover ground-truth
    event (the red circle called blue, another word said) is that event described incorrectly; the
    remaining ground-truth events are missing, the remaining caption events hallucinated."""
    said, truth = Counter(map(tuple, caption_keys)), Counter(map(tuple, event_keys))
    matched = said & truth
    unsaid, extra = truth - matched, said - matched
    incorrect = 0
    for kind in {k[0] for k in unsaid}:
        incorrect += min(sum(v for k, v in unsaid.items() if k[0] == kind), sum(v for k, v in extra.items() if k[0] == kind))
    return {"events": len(event_keys), "matched": sum(matched.values()), "missed": sum(unsaid.values()) - incorrect,
            "incorrect": incorrect, "hallucinated": sum(extra.values()) - incorrect}
