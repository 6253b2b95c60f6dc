"""The zero-shot tasks eval.py scores, as documents prompted the way lm-evaluation-harness v0.4 (the paper's)
prompts them, read from the Hugging Face hub or from offline copies (the layout of ../shared/data/evals).

    from tools.tasks import TASKS, load_task
    docs = load_task("arc_easy", "../shared/data/evals", limit=100)   # data_dir None: the hub, through `datasets`

A document is {"context", "choices", "gold"}, each builder following the harness task file it names; eval.py
scores choice i as the log-likelihood of " " + choice_i after the context. WinoGrande is the harness's "multiple
input" case: {"choices" (contexts: the sentence up to the blank, option filled in), "target" (the rest, shared),
"gold"}. The builders take the original dataset rows (Hugging Face hub field names); the local readers further
down turn the offline copies into the same documents.
"""

import bz2
import csv
import glob
import json
import os
import re

from cli import UserError

# -----------------------------------------------------------------------------
# Prompts, from the original rows

def hellaswag_clean(text):
    """The harness's hellaswag/utils.py preprocess: WikiHow's bracketed markers out, " [title]" -> ". "."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(row):
    # hellaswag/utils.py process_docs: the query is activity_label + ": " + ctx_a + " " + ctx_b.capitalize()
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {"context": hellaswag_clean(row["activity_label"] + ": " + ctx),
            "choices": [hellaswag_clean(e) for e in row["endings"]], "gold": int(row["label"])}


def arc_doc(row):
    # arc/arc_easy.yaml (arc_challenge.yaml includes it)
    return {"context": f"Question: {row['question']}\nAnswer:", "choices": list(row["choices"]["text"]),
            "gold": row["choices"]["label"].index(row["answerKey"])}


def piqa_doc(row):
    # piqa/piqa.yaml
    return {"context": f"Question: {row['goal']}\nAnswer:", "choices": [row["sol1"], row["sol2"]],
            "gold": int(row["label"])}


def winogrande_doc(row):
    # winogrande/preprocess_winogrande.py: the option goes into the context, the rest of the sentence
    # after the blank is the shared continuation
    blank = row["sentence"].index("_")
    return {"choices": [row["sentence"][:blank] + row[o] for o in ("option1", "option2")],
            "target": row["sentence"][blank + 1:].strip(), "gold": int(row["answer"]) - 1}


def boolq_doc(row):
    # super_glue/boolq/default.yaml
    return {"context": f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", "choices": ["no", "yes"],
            "gold": int(row["label"])}


def openbookqa_doc(row):
    # openbookqa/openbookqa.yaml: the bare question stem
    return {"context": row["question_stem"], "choices": list(row["choices"]["text"]),
            "gold": row["choices"]["label"].index(row["answerKey"].lstrip())}


def mmlu_doc(row):
    # mmlu/default/_default_template_yaml plus each subject's description, 0-shot
    subject = row["subject"].replace("_", " ")
    c = row["choices"]
    return {"context": f"The following are multiple choice questions (with answers) about {subject}.\n\n"
                       f"{row['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:",
            "choices": ["A", "B", "C", "D"], "gold": int(row["answer"]), "subject": row["subject"]}


# where the harness loads each task from: (hub dataset, config, split, row -> document)
HUB = {
    "hellaswag": ("Rowan/hellaswag", None, "validation", hellaswag_doc),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", arc_doc),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", arc_doc),
    "piqa": ("baber/piqa", None, "validation", piqa_doc),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation", winogrande_doc),
    "boolq": ("aps/super_glue", "boolq", "validation", boolq_doc),
    "openbookqa": ("allenai/openbookqa", "main", "test", openbookqa_doc),
    "mmlu": ("cais/mmlu", "all", "test", mmlu_doc),
}
TASKS = tuple(HUB)

# -----------------------------------------------------------------------------
# The offline copies, read into the same documents

def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def local_hellaswag(path):
    # klosax/hellaswag_text_data: 6 lines per item, activity_label + ": " + ctx, the gold index, 4 endings,
    # WikiHow markers already removed. ctx is ctx_a + " " + ctx_b with ctx_b not capitalised, and where
    # ctx_b starts is not recorded: it is the unfinished sentence at the end (ActivityNet items; WikiHow
    # contexts end with a full stop and have no ctx_b), so we capitalise that, as the harness does.
    lines = bz2.open(path, "rt", encoding="utf-8").read().splitlines()
    docs = []
    for i in range(0, len(lines), 6):
        query = lines[i]
        end = [m.end() for m in re.finditer(r"[.!?] ", query)]
        if end and query[-1] not in ".!?\"'" and query[end[-1]:end[-1] + 1].islower():
            query = query[:end[-1]] + query[end[-1]:].capitalize()
        docs.append({"context": hellaswag_clean(query), "choices": [hellaswag_clean(e) for e in lines[i + 2:i + 6]],
                     "gold": int(lines[i + 1])})
    return docs


def local_query_doc(suffix, strip=""):
    # MosaicML llm-foundry {"query", "choices", "gold"}: the query is the harness's context up to "\nAnswer:"
    def read(path):
        return [{"context": r["query"].removeprefix(strip) + suffix, "choices": r["choices"], "gold": r["gold"]}
                for r in read_jsonl(path)]
    return read


def local_piqa(path):
    labels = os.path.join(os.path.dirname(path), "valid-labels.lst")
    if not os.path.isfile(labels):
        raise UserError(f"piqa: no {labels} (the labels of {path})")
    with open(labels) as f:
        labels = f.read().split()
    return [piqa_doc({**r, "label": label}) for r, label in zip(read_jsonl(path), labels, strict=True)]


def local_winogrande(path):
    # MosaicML {"context_options": sentence up to the blank + each option, "continuation": the rest, stripped}
    return [{"choices": r["context_options"], "target": r["continuation"], "gold": r["gold"]}
            for r in read_jsonl(path)]


def local_mmlu(path):
    # the hendrycks release: one headerless CSV per subject, columns question, A, B, C, D, answer letter
    docs = []
    for f in sorted(glob.glob(os.path.join(path, "*_test.csv"))):
        subject = os.path.basename(f).removesuffix("_test.csv")
        with open(f, encoding="utf-8", newline="") as fh:
            for q, a, b, c, d, answer in csv.reader(fh):
                docs.append(mmlu_doc({"subject": subject, "question": q, "choices": [a, b, c, d],
                                      "answer": "ABCD".index(answer)}))
    if not docs:
        raise UserError(f"mmlu: no test files (*_test.csv) in {path}")
    return docs


# where each copy lies under --data_dir (../shared/data/evals, see its README), and its reader
LOCAL = {
    "hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2", local_hellaswag),
    "arc_easy": ("arc_easy/arc_easy.jsonl", local_query_doc("\nAnswer:")),
    "arc_challenge": ("arc_challenge/arc_challenge.jsonl", local_query_doc("\nAnswer:")),
    "piqa": ("piqa/valid.jsonl", local_piqa),
    "winogrande": ("winogrande/winogrande.jsonl", local_winogrande),
    "boolq": ("boolq/boolq.jsonl", local_query_doc("\nAnswer:", strip="Passage: ")),
    "openbookqa": ("openbookqa/openbook_qa.jsonl", local_query_doc("")),
    "mmlu": ("mmlu/test", local_mmlu),
}


def load_task(name, data_dir=None, limit=None):
    """Documents of a task: from the hub through `datasets`, or from the offline copies in data_dir.

    limit keeps the first `limit` documents, of each subject for MMLU (whose subjects are separate tasks
    in the harness, which applies --limit to each).
    """
    if name not in HUB:
        raise UserError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    if data_dir is None:
        import datasets
        path, config, split, build = HUB[name]
        try:
            rows = datasets.load_dataset(path, config, split=split)
        except ConnectionError as e:  # what it raises offline (no route, or HF_HUB_OFFLINE=1), after its retries
            raise UserError(f"{name}: the Hugging Face hub is unreachable ({e}): pass --data_dir DIR, offline copies "
                            f"in the layout of ../shared/data/evals") from None
        docs = [build(row) for row in rows]
    else:
        if not os.path.isdir(data_dir):
            raise UserError(f"no eval data folder {data_dir} (--data_dir takes the layout of ../shared/data/evals)")
        rel, read = LOCAL[name]
        path = os.path.join(data_dir, rel)
        if not os.path.exists(path):
            raise UserError(f"{name}: no {path} (--data_dir must hold the layout of ../shared/data/evals)")
        docs = read(path)
    if limit is None:
        return docs
    kept, seen = [], {}
    for doc in docs:
        key = doc.get("subject")
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= limit:
            kept.append(doc)
    return kept

