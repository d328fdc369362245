"""The SVAMP-style few-shot exemplars, shared by benchmark=svamp and lm_eval's `qexp_svamp`
task (qexp/benchmarks/harness.py), so both prompt the model the same way."""

# Worked examples for the few-shot prompt; written for qexp, not taken from any eval set.
EXEMPLARS = [
    (
        "Jake has 5 red balls and 7 blue balls.",
        "How many balls does Jake have?",
        "Jake has 5 + 7 = 12 balls. The answer is 12.",
    ),
    (
        "A baker made 30 muffins and sold 18 of them.",
        "How many muffins are left?",
        "30 - 18 = 12 muffins are left. The answer is 12.",
    ),
    (
        "There are 4 tables and each table has 6 chairs.",
        "How many chairs are there?",
        "4 * 6 = 24 chairs. The answer is 24.",
    ),
    (
        "Anna has 20 grapes and splits them equally among 5 friends.",
        "How many grapes does each friend get?",
        "20 / 5 = 4 grapes each. The answer is 4.",
    ),
    (
        "Paul had 9 stamps. He bought 3 packs with 4 stamps in each pack.",
        "How many stamps does Paul have now?",
        "3 * 4 = 12 new stamps, and 9 + 12 = 21. The answer is 21.",
    ),
    (
        "A farm has 50 hens. 14 hens were sold and 6 new hens were bought.",
        "How many hens does the farm have now?",
        "50 - 14 = 36, and 36 + 6 = 42. The answer is 42.",
    ),
    (
        "Lucy read 8 pages on Monday and twice as many on Tuesday.",
        "How many pages did Lucy read on Tuesday?",
        "2 * 8 = 16 pages. The answer is 16.",
    ),
    (
        "A class of 28 students forms teams of 4.",
        "How many teams are there?",
        "28 / 4 = 7 teams. The answer is 7.",
    ),
]
