"""A small evaluation set of our own for KB + web fusion: passages split between a knowledge
base and pages on a local web server, one question per passage (the answer is in that passage
only). Used by tests/retrieval/web/test_fusion.py and bench/web.py."""

from __future__ import annotations

# (where, title, passage, question, a phrase only that passage contains)
ITEMS = [
    ("kb", "Expense policy", "Employees may claim up to 45 euros per day for meals on business trips; receipts "
     "are required for every claim above 10 euros.", "How much can I claim per day for meals on a business trip?", "45 euros"),
    ("kb", "VPN setup", "The company VPN uses WireGuard. New laptops receive their VPN profile from the IT portal "
     "within one hour of enrolment.", "Which protocol does the company VPN use?", "WireGuard"),
    ("kb", "On-call rotation", "The platform team's on-call rotation changes every Tuesday at 10:00; the handover "
     "happens in the #oncall channel.", "When does the on-call rotation change?", "every Tuesday at 10:00"),
    ("kb", "Office plants", "The office ficus trees are watered by the facilities team on Mondays and Thursdays.",
     "Who waters the office ficus trees?", "facilities team"),
    ("kb", "Release process", "Every release needs two approvals in the release checklist, one of them from QA, "
     "before the tag is pushed.", "How many approvals does a release need?", "two approvals"),
    ("kb", "Parking", "Parking spaces in the basement garage are assigned by lottery every January.",
     "How are basement parking spaces assigned?", "by lottery every January"),
    ("web", "Barn owl - Wikipedia", "The barn owl swallows its prey whole and regurgitates pellets of fur and bone "
     "about seven hours later.", "What does a barn owl regurgitate after eating?", "pellets of fur and bone"),
    ("web", "Rust 1.80 released", "Rust 1.80 stabilised LazyCell and LazyLock, lazily initialised values for "
     "single-threaded and thread-safe use.", "Which lazy types did Rust 1.80 stabilise?", "LazyCell and LazyLock"),
    ("web", "Mount Kilimanjaro", "Kilimanjaro's highest summit, Uhuru Peak on the Kibo cone, stands 5,895 metres "
     "above sea level.", "How high is Uhuru Peak?", "5,895 metres"),
    ("web", "Sourdough starter guide", "Feed a sourdough starter equal weights of flour and water once a day when it "
     "is kept at room temperature.", "How often should a sourdough starter be fed at room temperature?", "once a day"),
    ("web", "The Danube", "The Danube flows through ten countries, more than any other river in the world, "
     "and empties into the Black Sea.", "How many countries does the Danube flow through?", "ten countries"),
    ("web", "Honey bee colonies", "A honey bee colony has a single queen, tens of thousands of female workers and a "
     "few hundred male drones in summer.", "How many queens does a honey bee colony have?", "a single queen"),
]

# Distractors: near the topics, never the answer.
DISTRACTORS = [
    ("kb", "Travel booking", "Book business trips through the travel portal at least two weeks in advance."),
    ("kb", "IT portal", "The IT portal lists laptop models and their delivery times."),
    ("web", "Tawny owl - Wikipedia", "The tawny owl is a stocky, medium-sized owl common in woodlands across Europe."),
    ("web", "Rust 1.79 released", "Rust 1.79 stabilised inline const expressions and extended automatic temporary "
     "lifetime extension."),
]
