"""course_tools: the tooling beside the course, not part of what the lessons teach.

    checking.py        the checker protocol: Exercise, checks, feedback tables (notebooks and grader)
    agent.py           the objects a check sees of a learner's code, in a notebook or across the sandbox
    grading/           the grader (``python3 course.py grade``) and the student-notebook generator
    workshop_check.py  drives JupyterLab in headless Chromium to check a workshop machine
    execute.py         re-executes notebooks in place (``python3 course.py execute``)

The lessons import ``course_lib``; ``docs/architecture.md`` says what depends on what.
"""
