"""kd: knowledge distillation (Hinton et al. 2015) of a classifier (a wider CNN trained on the labels
first, or the pipeline's frozen encoder and its linear probe) into a small CNN; the student trained
twice with the same seed and budget, with the soft term and on the labels alone; top-1 on the test
split, parameters and images/s of teacher and students."""

from prefect import flow

from runtime.stage import StageRun
from runtime.stage_flow import stage_task
from runtime.stage_process import main
from tasks.data import load_split
from tasks.kd import (
    export_student,
    load_probe_teacher,
    logits_of,
    parameters,
    top1_and_speed,
    top1_gain,
    train_cnn,
)
from tasks.params import KdParams
from tasks.training import TrainingContext


@flow(name="kd", log_prints=True)
def kd(params: KdParams) -> None:
    with StageRun("kd", params) as run:
        train = load_split("train", run.device)
        train_task = stage_task(train_cnn, name="train")
        results = {}
        if params.teacher == "cnn":
            results["teacher"] = train_task(params, train, TrainingContext.of(run), "teacher")
            teacher = results["teacher"].module.student.eval()
            teacher_logits = logits_of(teacher, train, params.batch_size)
        else:
            teacher, teacher_logits = load_probe_teacher(len(train), run.device)
        alphas = {"with_kd": params.alpha, "without_kd": 0.0}  # the second: the labels alone
        for name, alpha in alphas.items():
            results[name] = train_task(params, train, TrainingContext.of(run), name, teacher_logits, alpha)
        if not run.is_main:
            return
        run.curves.combine("students", [*alphas, "teacher"])  # plots/kd/students.csv: a line per network
        test = load_split("test", run.device)
        measure = stage_task(top1_and_speed, name="evaluate")
        run.metrics["teacher.top1"], run.metrics["teacher.images_per_s"] = measure(teacher, test, params.batch_size)
        run.metrics["teacher.parameters"] = parameters(teacher)
        students = {name: results[name].module.student.eval() for name in alphas}
        for name, student in students.items():
            run.metrics[f"student.{name}.top1"], run.metrics[f"student.{name}.images_per_s"] = measure(student, test, params.batch_size)
        run.metrics["student.parameters"] = parameters(students["with_kd"])
        export_student(students["with_kd"], run.outputs.artifacts)
        run.log_model("kd_student", "classifier", test.floats(slice(0, 2)), network="student")
        seconds = sum(result.seconds for result in results.values())
        run.metrics.update(
            steps=sum(result.steps for result in results.values()), train_seconds=round(seconds, 2),
            kd_gain=top1_gain(run.metrics["student.with_kd.top1"], run.metrics["student.without_kd.top1"], len(test)),
        )
        for key in [key for key in run.metrics if key.endswith("images_per_s")]:
            run.metrics[key] = round(run.metrics[key], 1)
        print(f"kd: teacher top-1 {run.metrics['teacher.top1']:.4f} ({run.metrics['teacher.parameters']:,} parameters); "
              f"student {run.metrics['student.with_kd.top1']:.4f} with KD, {run.metrics['student.without_kd.top1']:.4f} "
              f"without ({run.metrics['student.parameters']:,} parameters)")


if __name__ == "__main__":
    main("kd", kd)
