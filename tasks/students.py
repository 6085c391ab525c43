"""Few-step students of a diffusion teacher: denoisers (tasks/diffusion.py) listed in students.json
with the steps and guidance they sample at. Written by the distill stage, read by it and by fid."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tasks.artifacts import read_json
from tasks.diffusion import Denoiser, export_denoiser, load_denoiser

STUDENTS = "students.json"


@dataclass
class Student:
    steps: int  # sampler steps it was made for
    denoiser: Denoiser
    guidance: float  # what it samples at to reproduce the teacher at the target guidance


def student_network(method: str, steps: int) -> str:
    """The name a student's files are exported under: reflow and consistency distillation make one
    student for every step count."""
    return f"student_{steps}_steps" if method == "progressive" else "student"


def export_students(students: list[Student], method: str, target_guidance: float, folder: Path) -> None:
    """Each distinct student as a denoiser, and students.json: which one samples at which steps."""
    index = []
    for student in students:
        name = student_network(method, student.steps)
        if not (folder / f"{name}.json").exists():
            export_denoiser(student.denoiser, folder, name)
        index.append({"steps": student.steps, "name": name, "guidance": student.guidance})
    info = {"method": method, "target_guidance": target_guidance, "students": index}
    (folder / STUDENTS).write_text(json.dumps(info, indent=2) + "\n")


def load_students(folder: Path | str, device: torch.device | str = "cpu") -> tuple[list[Student], float]:
    """The students (fewest steps first) and the teacher guidance they reproduce."""
    folder = Path(folder)
    info = read_json(folder / STUDENTS, keys=("students", "target_guidance"))
    loaded: dict[str, Denoiser] = {}
    students = []
    for entry in sorted(info["students"], key=lambda entry: entry["steps"]):
        if entry["name"] not in loaded:
            loaded[entry["name"]] = load_denoiser(folder, device, entry["name"])
        students.append(Student(entry["steps"], loaded[entry["name"]], entry["guidance"]))
    return students, info["target_guidance"]
