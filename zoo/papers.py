"""The papers the registered models come from, keyed by the arXiv id in ``ModelCfg.paper``, and their BibTeX.

Plain data (no model imports), so ``zoo info NAME --bibtex`` and the docs read it without building anything. Entries
give the arXiv title and author list; ``venue`` names the peer-reviewed version where there is one.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Paper:
    key: str  # BibTeX citation key
    title: str
    authors: tuple[str, ...]  # "Given Family" as on arXiv
    year: int
    venue: str = ""  # booktitle / journal of the reviewed version, "" for an arXiv-only report
    kind: str = "inproceedings"  # BibTeX entry type when venue is set: inproceedings or article
    short: str = ""  # short name for tables, e.g. "Next-ViT"


PAPERS: dict[str, Paper] = {
    "2207.05501": Paper(
        "li2022nextvit",
        "Next-ViT: Next Generation Vision Transformer for Efficient Deployment in Realistic Industrial Scenarios",
        ("Jiashi Li", "Xin Xia", "Wei Li", "Huixia Li", "Xing Wang", "Xuefeng Xiao", "Rui Wang", "Min Zheng",
         "Xin Pan"), 2022, short="Next-ViT"),
    "2303.14189": Paper(
        "vasu2023fastvit", "FastViT: A Fast Hybrid Vision Transformer using Structural Reparameterization",
        ("Pavan Kumar Anasosalu Vasu", "James Gabriel", "Jeff Zhu", "Oncel Tuzel", "Anurag Ranjan"), 2023,
        "Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)", short="FastViT"),
    "2311.17049": Paper(
        "vasu2024mobileclip", "MobileCLIP: Fast Image-Text Models through Multi-Modal Reinforced Training",
        ("Pavan Kumar Anasosalu Vasu", "Hadi Pouransari", "Fartash Faghri", "Raviteja Vemulapalli", "Oncel Tuzel"),
        2024, "Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)",
        short="MobileCLIP"),
    "2508.20691": Paper(
        "faghri2025mobileclip2", "MobileCLIP2: Improving Multi-Modal Reinforced Training",
        ("Fartash Faghri", "Pavan Kumar Anasosalu Vasu", "Cem Koc", "Vaishaal Shankar", "Alexander Toshev",
         "Oncel Tuzel", "Hadi Pouransari"), 2025, "Transactions on Machine Learning Research", kind="article",
        short="MobileCLIP2"),
    "2412.13303": Paper(
        "vasu2025fastvlm", "FastVLM: Efficient Vision Encoding for Vision Language Models",
        ("Pavan Kumar Anasosalu Vasu", "Fartash Faghri", "Chun-Liang Li", "Cem Koc", "Nate True", "Albert Antony",
         "Gokul Santhanam", "James Gabriel", "Peter Grasch", "Oncel Tuzel", "Hadi Pouransari"), 2025,
        "Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)", short="FastVLM"),
    "2004.14525": Paper(
        "xiong2021mobiledets", "MobileDets: Searching for Object Detection Architectures for Mobile Accelerators",
        ("Yunyang Xiong", "Hanxiao Liu", "Suyog Gupta", "Berkin Akin", "Gabriel Bender", "Yongzhe Wang",
         "Pieter-Jan Kindermans", "Mingxing Tan", "Vikas Singh", "Bo Chen"), 2021,
        "Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)", short="MobileDets"),
    "2511.23404": Paper("liquidai2025lfm2", "LFM2 Technical Report", ("Liquid AI",), 2025, short="LFM2"),
    "2511.18890": Paper(
        "fu2025nemotronflash", "Nemotron-Flash: Towards Latency-Optimal Hybrid Small Language Models",
        ("Yonggan Fu", "Xin Dong", "Shizhe Diao", "Matthijs Van keirsbilck", "Hanrong Ye", "Wonmin Byeon",
         "Yashaswi Karnati", "Lucas Liebenwein", "Hannah Zhang", "Nikolaus Binder", "Maksim Khadkevich",
         "Alexander Keller", "Jan Kautz", "Yingyan Celine Lin", "Pavlo Molchanov"), 2025,
        "Advances in Neural Information Processing Systems (NeurIPS)", short="Nemotron-Flash"),
    "2110.05929": Paper(
        "chowdhury2021onetimestep",
        "One Timestep is All You Need: Training Spiking Neural Networks with Ultra Low Latency",
        ("Sayeed Shafayet Chowdhury", "Nitin Rathi", "Kaushik Roy"), 2021, short="IIR-SNN"),
    "2304.05152": Paper(
        "tang2023ppmobileseg",
        "PP-MobileSeg: Explore the Fast and Accurate Semantic Segmentation Model on Mobile Devices",
        ("Shiyu Tang", "Ting Sun", "Juncai Peng", "Guowei Chen", "Yuying Hao", "Manhui Lin", "Zhihong Xiao",
         "Jiangbin You", "Yi Liu"), 2023, short="PP-MobileSeg"),
    "2311.05707": Paper(
        "tan2023fmvit", "FMViT: A multiple-frequency mixing Vision Transformer",
        ("Wei Tan", "Yifeng Geng", "Xuansong Xie"), 2023, short="FMViT"),
    "2405.14458": Paper(
        "wang2024yolov10", "YOLOv10: Real-Time End-to-End Object Detection",
        ("Ao Wang", "Hui Chen", "Lihao Liu", "Kai Chen", "Zijia Lin", "Jungong Han", "Guiguang Ding"), 2024,
        "Advances in Neural Information Processing Systems (NeurIPS)", short="YOLOv10"),
    "2410.12628": Paper(
        "zhao2024doclayoutyolo",
        "DocLayout-YOLO: Enhancing Document Layout Analysis through Diverse Synthetic Data and Global-to-Local "
        "Adaptive Perception",
        ("Zhiyuan Zhao", "Hengrui Kang", "Bin Wang", "Conghui He"), 2024, short="DocLayout-YOLO"),
}


def _bib_author(name: str) -> str:
    if " " not in name or name == "Liquid AI":  # an organisation: braces keep BibTeX from splitting it
        return "{" + name + "}"
    given, family = name.rsplit(" ", 1)
    return f"{family}, {given}"


def bibtex(arxiv_id: str) -> str:
    """The BibTeX entry of a paper by arXiv id; KeyError names the known ids."""
    if arxiv_id not in PAPERS:
        raise KeyError(f"no BibTeX recorded for arXiv {arxiv_id!r}; known: {', '.join(sorted(PAPERS))}")
    p = PAPERS[arxiv_id]
    kind = p.kind if p.venue else "misc"
    fields = [("title", "{" + p.title + "}"), ("author", " and ".join(map(_bib_author, p.authors)))]
    if p.venue:
        fields.append(("booktitle" if kind == "inproceedings" else "journal", p.venue))
    fields += [("year", str(p.year)), ("eprint", arxiv_id), ("archivePrefix", "arXiv"),
               ("url", f"https://arxiv.org/abs/{arxiv_id}")]
    body = ",\n".join(f"  {k:<13} = {{{v}}}" for k, v in fields)
    return f"@{kind}{{{p.key},\n{body}\n}}"
