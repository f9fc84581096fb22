"""Evaluation on the paper's benchmarks (section 5, Appendix C): tools/evaluate.py's library.

Readers of each benchmark's files (coco_files, vqa_files, visdial_files, video_files),
metrics (vqa_accuracy, caption_scores, ranking, frechet), prompts (prompting, rices),
answering (predict, likelihood), running (runner, distributed, cache) and results (scoring,
report, paper).
"""
