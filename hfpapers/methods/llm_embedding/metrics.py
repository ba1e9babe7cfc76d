"""The paper's evaluation at small scale: STS, retrieval, classification and clustering scores of an embedding
model on a suite of datasets (MTEB's main scores for each category), and the table that compares models with a
paired Wilcoxon signed-rank test over the datasets of each category (paper §4: absolute scores for the baseline,
deltas with `*` where p < 0.05).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Embed = Callable[[list[str]], np.ndarray]  # texts -> (n, dim) L2-normalised embeddings
CATEGORY_TITLES = {"sts": "STS", "classification": "Clas.", "retrieval": "Retr.", "clustering": "Clus."}


def sts_spearman(embed: Embed, sentence1: list[str], sentence2: list[str], scores: list[float]) -> float:
    """Spearman correlation between the cosine similarity of each pair and its gold score (MTEB STS)."""
    from scipy.stats import spearmanr

    a, b = embed(sentence1), embed(sentence2)
    return float(spearmanr((a * b).sum(-1), scores).statistic)


def retrieval_scores(embed: Embed, queries: list[str], corpus: list[str], relevant: list[list[int]],
                     k: int = 10) -> dict[str, float]:
    """nDCG@k (binary relevance, MTEB Retrieval's main score) and MRR@k of cosine ranking over the corpus."""
    similarity = embed(queries) @ embed(corpus).T
    ranking = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    ndcg, mrr = [], []
    for ranked, gold in zip(ranking, relevant):
        gains = np.isin(ranked, gold).astype(float)
        discounts = 1.0 / np.log2(np.arange(2, len(ranked) + 2))
        ideal = discounts[: min(len(gold), k)].sum()
        ndcg.append(float((gains * discounts).sum() / ideal))
        hits = np.flatnonzero(gains)
        mrr.append(1.0 / (hits[0] + 1) if len(hits) else 0.0)
    return {"ndcg@10": float(np.mean(ndcg)), "mrr@10": float(np.mean(mrr))}


def classification_accuracy(embed: Embed, texts: list[str], labels: list[int], seed: int = 0) -> float:
    """Accuracy of a logistic regression on the embeddings, trained on one half and tested on the other
    (stratified), as MTEB fits a logistic regression on frozen embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x, y = embed(texts), np.asarray(labels)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.5, random_state=seed, stratify=y)
    classifier = LogisticRegression(max_iter=1000).fit(x_train, y_train)
    return float(classifier.score(x_test, y_test))


def clustering_v_measure(embed: Embed, texts: list[str], labels: list[int], seed: int = 0) -> float:
    """V-measure of k-means (k = number of labels) on the embeddings against the labels (MTEB Clustering)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import v_measure_score

    clusters = KMeans(n_clusters=len(set(labels)), n_init=10, random_state=seed).fit_predict(embed(texts))
    return float(v_measure_score(labels, clusters))


def evaluate_suite(embed: Embed, suite: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Main score of every dataset of the suite, {category: {dataset name: score}} (nDCG@10 for retrieval)."""
    results: dict[str, dict[str, float]] = {}
    for category, datasets in suite.items():
        scores = {}
        for data in datasets:
            if category == "sts":
                scores[data["name"]] = sts_spearman(embed, data["sentence1"], data["sentence2"], data["score"])
            elif category == "retrieval":
                scores[data["name"]] = retrieval_scores(embed, data["queries"], data["corpus"],
                                                        data["relevant"])["ndcg@10"]
            elif category == "classification":
                scores[data["name"]] = classification_accuracy(embed, data["text"], data["label"])
            elif category == "clustering":
                scores[data["name"]] = clustering_v_measure(embed, data["text"], data["label"])
            else:
                raise ValueError(f"unknown category {category!r}; expected one of {list(CATEGORY_TITLES)}")
        results[category] = scores
    return results


def evaluate_checkpoint(folder: str, suite: dict[str, list[dict]], instruction: str = "") -> dict[str, dict[str, float]]:
    """`evaluate_suite` for a saved model folder (model and tokenizer loaded with the Auto classes)."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return evaluate_suite(lambda texts: model.encode(texts, tokenizer, instruction=instruction).numpy(), suite)


def paired_comparison(baseline: dict[str, dict[str, float]], other: dict[str, dict[str, float]],
                      alpha: float = 0.05) -> dict[str, tuple[float, float, bool]]:
    """Per category: (mean delta other - baseline, Wilcoxon signed-rank p-value over the paired datasets,
    significant at `alpha`). A p-value of 1 when every delta is zero."""
    from scipy.stats import wilcoxon

    comparison = {}
    for category, scores in baseline.items():
        names = sorted(scores)
        if sorted(other[category]) != names:
            raise ValueError(f"{category}: the two results cover different datasets")
        deltas = np.array([other[category][n] - scores[n] for n in names])
        p_value = 1.0 if not deltas.any() else float(wilcoxon(deltas).pvalue)
        comparison[category] = (float(deltas.mean()), p_value, p_value < alpha)
    return comparison


def format_table(results: dict[str, dict[str, dict[str, float]]], baseline: str, alpha: float = 0.05) -> str:
    """The paper's table: the baseline's mean score per category, then each other model's mean delta, with `*`
    where the paired Wilcoxon test over the category's datasets gives p < alpha."""
    categories = list(results[baseline])
    header = "| | " + " | ".join(CATEGORY_TITLES.get(c, c) for c in categories) + " |"
    lines = [header, "|---" * (len(categories) + 1) + "|"]
    lines.append(f"| {baseline} (absolute) | " + " | ".join(
        f"{np.mean(list(results[baseline][c].values())):.4f}" for c in categories) + " |")
    for name, result in results.items():
        if name == baseline:
            continue
        comparison = paired_comparison(results[baseline], result, alpha)
        cells = [f"{comparison[c][0]:+.4f}{'*' if comparison[c][2] else ''}" for c in categories]
        lines.append(f"| {name} (Δ) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["classification_accuracy", "clustering_v_measure", "evaluate_checkpoint", "evaluate_suite", "format_table",
           "paired_comparison", "retrieval_scores", "sts_spearman"]
