"""
Offline generator of TinyStories-like children's stories.

Used by `python tinystories.py sample` to build a small offline corpus when the
real TinyStories data set cannot be downloaded. The stories are simple English
("Once upon a time, there was a little girl named Lily. She loved to play ...")
but vary deliberately along the axes this project measures in pretraining
batches:

- length: about 3 to 28 planned sentences (short / medium / long buckets)
- vocabulary: "simple" stories reuse a small core vocabulary, "rich" ones draw
  on larger synonym lists and extra descriptive sentences (higher type-token ratio)
- sentiment of the ending: happy, sad, scary-then-relieved, angry
- dialogue share: no dialogue, some dialogue, mostly dialogue (double quotes)
- readability: short simple sentences vs. merged compound sentences with
  adverbial openers
- gender of the characters: girls, boys, mixed pairs, animals (he/she/it);
  the mix is configurable and by default realistic but not balanced
- repetition: a few stories carry a repeated refrain
- surface form: several openings (~60% "Once upon a time"), optional paragraph
  breaks, and a small share of curly quotes / accented names.

All word lists and templates were written for this module.

Determinism: stories depend only on (n, seed, style). Only `random.Random.random()`
is used (the Mersenne Twister stream, stable across Python versions and
machines); no global random state, no string hashing. The stream is consumed
sequentially, so `generate_stories(k, s)` is a prefix of `generate_stories(n, s)`
for k <= n.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from prebias.common import SEED

__all__ = [
    "StoryStyle",
    "DEFAULT_STYLE",
    "generate_stories",
    "generate_story_records",
    "story_features",
]

# -----------------------------------------------------------------------------
# style knobs


@dataclass(frozen=True)
class StoryStyle:
    """Mixture weights of the generator. Weights need not sum to one.

    once_upon_share: share of stories that open with "Once upon a time".
    cast_weights: main cast kind -> weight ("girl", "boy", "mixed" = girl+boy
        pair, "animal"). The default leans slightly female, like TinyStories.
    animal_pronoun_weights: pronoun of an animal protagonist.
    dialogue_weights: "none" / "some" (1-3 quoted lines) / "mostly".
    length_weights: "short" (3-6 sentences) / "medium" (8-17) / "long" (18-28).
    sentiment_weights: ending sentiment "happy" / "sad" / "scary" (scary, then
        relieved) / "angry".
    rich_vocab_share: share of stories using the larger vocabulary.
    compound_share: share of stories with merged, longer compound sentences.
    refrain_share: share of stories with a repeated refrain.
    paragraph_share: share of stories split into paragraphs with blank lines.
    unicode_share: share of stories with curly quotes/apostrophes.
    accented_name_share: chance that a child name comes from the accented list.
    """

    once_upon_share: float = 0.6
    cast_weights: Tuple[Tuple[str, float], ...] = (
        ("girl", 0.38), ("boy", 0.31), ("mixed", 0.19), ("animal", 0.12))
    animal_pronoun_weights: Tuple[Tuple[str, float], ...] = (
        ("he", 0.40), ("she", 0.35), ("it", 0.25))
    dialogue_weights: Tuple[Tuple[str, float], ...] = (
        ("none", 0.35), ("some", 0.45), ("mostly", 0.20))
    length_weights: Tuple[Tuple[str, float], ...] = (
        ("short", 0.12), ("medium", 0.55), ("long", 0.33))
    sentiment_weights: Tuple[Tuple[str, float], ...] = (
        ("happy", 0.55), ("sad", 0.16), ("scary", 0.17), ("angry", 0.12))
    rich_vocab_share: float = 0.4
    compound_share: float = 0.4
    refrain_share: float = 0.08
    paragraph_share: float = 0.45
    unicode_share: float = 0.03
    accented_name_share: float = 0.02


DEFAULT_STYLE = StoryStyle()

# -----------------------------------------------------------------------------
# word lists

GIRL_NAMES = (
    "Lily Sue Mia Anna Emma Lucy Sara Amy Ella Rose Kate Jane Molly Daisy Ruby "
    "Grace Zoe Lola Ava Chloe Nora Hannah Lisa Maya Bella Ivy Jenny Julia Kim "
    "Lena Tina Mary Nina Olive Penny Rosie Sophie Tara Wendy Clara Alice Fiona "
    "Holly Iris Jasmine Kelly Laura Megan Nell Paula Rita Sally Tess Violet "
    "Abby Beth Cara Dina Elsa Fay Gina Hope Josie Leah Luna Mila Poppy Sadie "
    "Amber Bonnie Cora Delia Edie Freya Greta Hazel Ingrid Junie Katie Lottie "
    "Mabel Nadia Opal Pearl Quinn Rhea Stella Tilly Uma Vera Willa Yara Zara "
    "Ada Bea Cleo Dora Eve Flora Gwen Hattie Isla Joy Kara Lila Maisie Nia"
).split()
BOY_NAMES = (
    "Tom Tim Ben Sam Max Jack Leo Jake Mark Bob Joe Luke Dan Adam Ryan Alex "
    "Billy Eddie Finn Gus Henry Ian Jimmy Kevin Liam Mike Ned Oscar Pete Roy "
    "Simon Toby Victor Will Zack Andy Carl David Eric Frank George Hugo Jay "
    "Kyle Lenny Matt Noah Owen Paul Rex Sid Ted Vince Walt Arlo Bruno Caleb "
    "Dylan Ezra Felix Harry Jonah Louis Milo Nick Otto Ralph Seth Theo "
    "Abe Barney Cody Dexter Elliot Fred Gabe Hank Ivan Jasper Kit Lucas "
    "Morris Nate Ollie Percy Rudy Stan Tucker Ulysses Wesley Xavier Yusuf "
    "Alfie Bert Clyde Duncan Emil Fritz Gordon Hector Igor Jude Kenny Lars Monty Norman"
).split()
ACCENTED_GIRLS = ("Zo\u00eb", "Chlo\u00e9", "Ren\u00e9e", "In\u00e9s", "L\u00e9a", "No\u00e9mie")
ACCENTED_BOYS = ("Jos\u00e9", "Andr\u00e9", "No\u00ebl", "Ren\u00e9", "J\u00falio", "Jo\u00ebl")

# (noun, typical pet name list is shared)
ANIMALS = (
    "cat kitten dog puppy bunny rabbit bear mouse fox frog duck duckling bird "
    "owl pig piglet cow horse pony lamb sheep goat chick hen squirrel deer "
    "turtle fish monkey elephant lion tiger giraffe zebra penguin seal whale "
    "dolphin bee ladybug butterfly snail hedgehog raccoon kangaroo koala panda "
    "beaver otter goose swan parrot crab mole hamster ant beetle worm lizard "
    "camel moose wolf badger puffin flamingo walrus octopus starfish "
    "caterpillar chipmunk skunk donkey gecko llama alpaca"
).split()
ANIMAL_NAMES = (
    "Spot Fluffy Whiskers Buddy Max Coco Pip Bubbles Sunny Snowy Patch Rusty "
    "Fuzzy Bingo Dotty Hoppy Ziggy Peanut Muffin Biscuit Cookie Pepper Ginger "
    "Button Squeaky Shelly Tiny Goldie Honey Sparky Nibbles Pebble Puddle Twig "
    "Mittens Flash Wiggles Dash Blossom Acorn Bramble Clover Dumpling Echo "
    "Fidget Gizmo Hazelnut Inky Jellybean Kipper Lulu Marshmallow Noodle Oreo "
    "Pickles Quackers Rascal Scamper Toffee Waffles"
).split()

PARENTS = (("mom", "she"), ("dad", "he"), ("grandma", "she"), ("grandpa", "he"),
           ("mom", "she"), ("dad", "he"), ("big sister", "she"), ("big brother", "he"),
           ("aunt", "she"), ("uncle", "he"))
ANIMAL_PARENTS = (("mama", "she"), ("papa", "he"), ("mother", "she"), ("father", "he"))

PLACES = (
    "park garden forest beach farm pond meadow playground field lake river "
    "zoo library market hill village town yard backyard school barn orchard "
    "valley jungle island castle circus fair bakery museum cave desert "
    "mountain seaside harbor swamp woods greenhouse campsite treehouse "
    "pier bridge cellar vineyard marsh canyon prairie stable windmill "
    "pasture creek waterfall classroom lighthouse station "
    "aquarium bookshop garage playhouse quarry rooftop sandbox tunnel"
).split()
TOYS = (
    "ball doll teddy kite car truck train boat robot puzzle drum yo-yo "
    "balloon crayon block top whistle bear rocket plane bike scooter "
    "wagon marble book hat shell rattle puppet dinosaur crown wand "
    "bucket spade jump-rope umbrella flute sticker necklace bracelet "
    "kazoo tambourine xylophone pinwheel lantern compass telescope magnet "
    "flashlight backpack sled skateboard teacup trumpet harmonica locket "
    "ribbon whistle globe paintbrush abacus bell boomerang canoe domino "
    "hula-hoop jigsaw keyboard lasso mitten notebook ornament piano quilt "
    "rope saddle tricycle ukulele violin"
).split()
COLORS = ("red blue green yellow pink purple orange brown white black gold "
          "silver shiny striped spotted").split()
FOODS = ("apple cookie cake sandwich banana pie carrot muffin pancake cherry "
         "grape peach pear plum berry cupcake pizza soup biscuit lemon "
         "orange melon cheese bread candy lollipop donut pumpkin strawberry "
         "waffle pretzel cracker taco dumpling mango kiwi coconut pineapple "
         "raisin walnut omelet bagel cucumber tomato potato radish blueberry "
         "raspberry apricot").split()
CLOTHES = ("red raincoat", "woolly hat", "yellow boots", "striped scarf", "blue overalls",
           "spotted dress", "green jacket", "fuzzy sweater", "new sneakers", "purple mittens",
           "polka-dot skirt", "denim shorts", "cozy pajamas", "straw hat", "silver crown",
           "pirate costume", "bumblebee costume", "rubber boots", "warm coat", "baseball cap")
TREATS = ("ice cream cone", "big cookie", "chocolate bar", "lollipop", "cupcake",
          "bag of candy", "slice of cake", "donut", "sweet bun", "toffee apple")
SPOTS = ("bed", "couch", "table", "rug", "chair", "box", "blanket", "door",
         "curtain", "sink", "shelf", "basket", "pillow", "stairs", "bush",
         "slide", "bench", "wagon", "hedge", "flower pot", "toy chest", "sofa")
HIDES = ("under the bed", "behind the couch", "in the toy box", "in the dog's basket",
         "under a pile of leaves", "inside a boot", "on top of the fridge",
         "in the laundry basket", "under the big tree", "in the sandbox",
         "next to the flower pot", "in the garden shed", "behind a cushion",
         "inside the bath tub", "in the car", "under the kitchen table")
ROOMS = ("house", "room", "kitchen", "garden", "yard", "attic", "closet", "playroom")
HARMLESS = ("the cat chasing a ball of yarn", "the wind tapping a branch on the window",
            "a little mouse looking for cheese", "a puppy chewing a slipper",
            "the rain dripping on the roof", "a coat hanging on a hook",
            "the washing machine going round and round", "an owl sitting on the fence",
            "a raccoon looking for food", "the old clock ticking",
            "a squirrel running on the roof", "a teddy bear on the chair",
            "a frog croaking by the pond", "the shadow of a big plant")
HELPERS = (("a kind old man", "he"), ("a friendly lady", "she"), ("a wise owl", "he"),
           ("a tall giraffe", "she"), ("a helpful farmer", "he"),
           ("a big brown bear", "he"), ("a gentle elephant", "she"),
           ("a clever fox", "she"), ("the mail carrier", "she"),
           ("a firefighter", "he"), ("a teacher", "she"), ("a tall neighbor", "he"))
WEATHER = ("sunny", "warm", "windy", "cloudy", "rainy", "snowy", "bright", "cold", "foggy")
TIMES = ("morning", "afternoon", "evening", "day", "night", "weekend", "summer day",
         "winter morning", "spring day", "fall afternoon")
TRAITS_SIMPLE = ("kind", "happy", "good", "nice", "funny", "shy", "brave", "silly")
TRAITS_RICH = ("curious", "cheerful", "clever", "gentle", "playful", "thoughtful",
               "adventurous", "generous", "stubborn", "patient", "bashful",
               "energetic", "imaginative", "mischievous", "polite", "careful")

# (base, past, ing) activity phrases
ACTIVITIES = (
    ("play with {his} blocks", "played with {his} blocks", "playing with {his} blocks"),
    ("run in the grass", "ran in the grass", "running in the grass"),
    ("jump in puddles", "jumped in puddles", "jumping in puddles"),
    ("draw pictures", "drew pictures", "drawing pictures"),
    ("sing songs", "sang songs", "singing songs"),
    ("dance", "danced", "dancing"),
    ("read books", "read books", "reading books"),
    ("swim in the lake", "swam in the lake", "swimming in the lake"),
    ("climb trees", "climbed trees", "climbing trees"),
    ("ride {his} bike", "rode {his} bike", "riding {his} bike"),
    ("build sand castles", "built sand castles", "building sand castles"),
    ("pick flowers", "picked flowers", "picking flowers"),
    ("look at the stars", "looked at the stars", "looking at the stars"),
    ("bake cookies", "baked cookies", "baking cookies"),
    ("paint", "painted", "painting"),
    ("play hide and seek", "played hide and seek", "playing hide and seek"),
    ("chase butterflies", "chased butterflies", "chasing butterflies"),
    ("collect shiny rocks", "collected shiny rocks", "collecting shiny rocks"),
    ("fly {his} kite", "flew {his} kite", "flying {his} kite"),
    ("play in the snow", "played in the snow", "playing in the snow"),
    ("help in the garden", "helped in the garden", "helping in the garden"),
    ("feed the ducks", "fed the ducks", "feeding the ducks"),
    ("play dress-up", "played dress-up", "playing dress-up"),
    ("blow bubbles", "blew bubbles", "blowing bubbles"),
    ("splash in the water", "splashed in the water", "splashing in the water"),
    ("roll down the hill", "rolled down the hill", "rolling down the hill"),
    ("make mud pies", "made mud pies", "making mud pies"),
    ("watch the clouds", "watched the clouds", "watching the clouds"),
    ("dig in the dirt", "dug in the dirt", "digging in the dirt"),
    ("play on the swings", "played on the swings", "playing on the swings"),
    ("count the birds", "counted the birds", "counting the birds"),
    ("play the drum", "played the drum", "playing the drum"),
    ("skip rope", "skipped rope", "skipping rope"),
    ("explore", "explored", "exploring"),
    ("listen to stories", "listened to stories", "listening to stories"),
    ("catch bugs", "caught bugs", "catching bugs"),
    ("eat {foods}", "ate {foods}", "eating {foods}"),
    ("play catch", "played catch", "playing catch"),
    ("hop and skip", "hopped and skipped", "hopping and skipping"),
    ("stack cups", "stacked cups", "stacking cups"),
)
# (goal base, goal past) for "try hard" stories
GOALS = (
    ("ride {his} bike without help", "rode {his} bike without help"),
    ("climb to the top of the big hill", "climbed to the top of the big hill"),
    ("tie {his} shoes", "tied {his} shoes"),
    ("swim across the pool", "swam across the pool"),
    ("whistle a song", "whistled a song"),
    ("build the tallest tower", "built the tallest tower"),
    ("catch the ball", "caught the ball"),
    ("jump over the log", "jumped over the log"),
    ("reach the top shelf", "reached the top shelf"),
    ("write {his} name", "wrote {his} name"),
    ("fly {his} kite high in the sky", "flew {his} kite high in the sky"),
    ("bake a cake", "baked a cake"),
    ("hop on one foot", "hopped on one foot"),
    ("count to twenty", "counted to twenty"),
    ("skate on the ice", "skated on the ice"),
    ("do a cartwheel", "did a cartwheel"),
)
STUCK_THINGS = ("kite", "ball", "balloon", "hat", "frisbee", "paper plane", "scarf", "shoe")
STUCK_PLACES = ("high in a tall tree", "up on the roof", "on top of the fence",
                "on a high branch", "on top of the shed", "in the top of the old oak")

# lexicon: key -> (simple words, rich words)
LEX: Dict[str, Tuple[Sequence[str], Sequence[str]]] = {
    "big": (("big",), ("huge", "enormous", "giant", "gigantic", "large", "mighty")),
    "small": (("small", "little"), ("tiny", "teeny", "little", "wee", "petite")),
    "happy": (("happy",), ("delighted", "joyful", "cheerful", "thrilled", "glad", "overjoyed")),
    "sad": (("sad",), ("gloomy", "unhappy", "miserable", "heartbroken", "blue", "sorrowful")),
    "scared": (("scared",), ("frightened", "terrified", "afraid", "nervous", "startled")),
    "angry": (("angry", "mad"), ("furious", "cross", "grumpy", "annoyed", "upset")),
    "pretty": (("pretty", "nice"), ("beautiful", "lovely", "gorgeous", "sparkly", "dazzling")),
    "good": (("good", "nice"), ("wonderful", "splendid", "marvelous", "fantastic", "terrific")),
    "fast": (("fast",), ("quickly", "swiftly", "speedily", "in a hurry")),
    "slowly": (("slowly",), ("carefully", "gently", "quietly", "softly", "cautiously")),
    "went": (("went", "walked"), ("wandered", "strolled", "skipped", "marched", "hurried", "trotted")),
    "ran": (("ran",), ("dashed", "raced", "rushed", "scampered", "sprinted", "zoomed")),
    "looked": (("looked",), ("peered", "peeked", "gazed", "glanced", "searched")),
    "saw": (("saw",), ("spotted", "noticed", "discovered", "found")),
    "said": (("said",), ("whispered", "exclaimed", "replied", "called", "announced", "shouted")),
    "asked": (("asked",), ("asked", "wondered", "inquired")),
    "laughed": (("laughed",), ("giggled", "chuckled", "grinned", "beamed")),
    "cried": (("cried",), ("sobbed", "wept", "sniffled", "whimpered")),
    "loud": (("loud",), ("thunderous", "booming", "noisy", "deafening")),
    "dark": (("dark",), ("gloomy", "shadowy", "pitch-black", "murky")),
    "very": (("very",), ("really", "so", "extremely", "truly")),
    "hug": (("hug",), ("squeeze", "cuddle", "warm hug")),
    "town": (("town",), ("village", "valley", "kingdom", "cottage", "countryside", "meadow")),
    "house": (("house",), ("cottage", "cabin", "farmhouse", "apartment", "bungalow")),
    "tree": (("tree",), ("oak", "willow", "pine", "maple", "birch")),
    "bird": (("bird",), ("robin", "sparrow", "bluebird", "finch", "blackbird", "wren")),
    "flower": (("flower",), ("daisy", "tulip", "rose", "sunflower", "poppy", "daffodil")),
    "yummy": (("yummy",), ("delicious", "tasty", "scrumptious", "sweet", "crunchy")),
    "tired": (("tired",), ("sleepy", "exhausted", "worn out", "drowsy")),
    "idea": (("idea",), ("plan", "clever idea", "bright idea", "brilliant idea", "splendid plan")),
    "brave": (("brave",), ("bold", "fearless", "courageous", "daring")),
    "quiet": (("quiet",), ("silent", "peaceful", "calm", "still", "hushed")),
}

OPENERS_RICH = ("After a while, ", "Later that day, ", "Just then, ", "Soon, ",
                "All of a sudden, ", "Before long, ", "At first, ", "Meanwhile, ",
                "A little later, ", "Without a word, ", "With a big smile, ")

FILLERS = (
    "The sun was {warm} and the sky was blue.",
    "A {bird} sang in a {tree} nearby.",
    "{He} took a deep breath.",
    "{He} thought and thought.",
    "The wind blew the leaves around.",
    "{He} could hear the {bird_pl} singing.",
    "There were {flower_pl} everywhere.",
    "{He} sat down on a rock to rest.",
    "{He} remembered what {his} {parent} always said.",
    "It was getting late.",
    "A {small} butterfly flew past {his} nose.",
    "{He} felt a little {tired}.",
    "{His} tummy made a funny sound.",
    "{He} ate a {yummy} {food} for a snack.",
    "The grass was soft and green.",
    "{He} waved to a {small} {animal} by the path.",
    "Clouds moved {slowly} across the sky.",
    "{He} counted to ten.",
    "Some ducks swam in the pond.",
    "{He} hummed a {small} song.",
    "{He} {looked} all around.",
    "The {place} was {quiet}.",
    "{He} found a feather on the ground.",
    "A dog barked far away.",
    "{He} saw {his} neighbor watering the plants.",
    "The ice cream truck played a song.",
    "A bus went by, full of people.",
    "{He} jumped over a little puddle.",
    "Two cats were sleeping in the sun.",
    "{He} heard a cow moo in the field.",
    "{He} wore {his} {clothes}.",
    "{He} put on {his} {clothes} and went out.",
    "A cat sat on the wall and watched {him}.",
    "{He} drank some water.",
    "The path was long and bumpy.",
    "{He} saw a {animal} eating {a_food}.",
    "{He} sang a song about {foods}.",
    "The {tree}s were very tall.",
    "Some kids were playing ball nearby.",
    "{He} picked up a {color} stone.",
)
FILLERS_RICH = (
    "The air smelled of fresh {flower_pl} and warm bread.",
    "Golden light danced on the water.",
    "A {small} {animal} {peeked} out of a bush.",
    "{He} noticed a trail of tiny footprints in the mud.",
    "Far away, a bell rang three times.",
    "The old {tree} creaked and swayed in the breeze.",
    "{He} wondered what adventure was waiting around the corner.",
    "A rainbow stretched over the {place} like a bridge.",
    "Pebbles crunched under {his} feet.",
    "The {bird_pl} chirped a cheerful tune.",
    "{He} felt brave, curious, and a tiny bit nervous.",
    "Leaves of red and gold twirled through the air.",
    "Somewhere, a frog croaked a grumpy song.",
    "Dewdrops glittered on a spider web.",
    "A gentle breeze tickled {his} cheeks.",
    "Fireflies blinked in the twilight.",
    "The river gurgled over smooth stones.",
    "Pinecones tumbled from the branches.",
    "A woodpecker tapped on a hollow log.",
    "The smell of cinnamon drifted from a nearby kitchen.",
    "Thunder rumbled far, far away.",
    "Snowflakes drifted down like feathers.",
    "A hedgehog snuffled among the mushrooms.",
    "Moss covered the rocks like a soft green carpet.",
    "The clouds looked like fluffy sheep.",
    "Crickets chirped in the tall reeds.",
    "Seagulls squawked above the waves.",
    "A kettle whistled somewhere inside a cottage.",
    "{He} wore {his} {clothes}, which made {him} feel important.",
    "The meadow hummed with busy bees collecting nectar.",
    "Long shadows stretched across the lawn.",
    "A curious squirrel nibbled an acorn and twitched its bushy tail.",
    "Raindrops pattered softly against the windowpane.",
    "The pond shimmered like a mirror.",
    "Tall sunflowers nodded their heavy heads.",
    "A ladybug crawled slowly along a blade of grass.",
    "The scent of pine needles filled the chilly air.",
    "Somewhere in the distance, a train chugged and tooted.",
    "An old scarecrow stood guard over the cornfield.",
    "Frost sparkled on every leaf like sugar.",
    "A sleepy tortoise blinked at {him} from under a fern.",
    "Bright kites fluttered above the sandy dunes.",
    "The bakery window was full of pastries and tarts.",
    "{He} listened to the whispering wind and the rustling leaves.",
    "A heron stood motionless in the shallow water.",
    "Acorns crunched beneath {his} boots.",
    "The orchard was heavy with ripe plums and crisp apples.",
    "A weathervane squeaked on top of the barn.",
    "Lilacs and honeysuckle perfumed the whole garden.",
    "A hot-air balloon drifted lazily over the hills.",
    "Icicles dripped from the gutter, one drop at a time.",
    "The puppet theater at the corner was closed for the afternoon.",
    "A mischievous magpie snatched a shiny button and flapped away.",
    "The attic was dusty and full of forgotten treasures.",
    "Marigolds lined the crooked garden path.",
    "A pair of otters somersaulted in the creek.",
)

# problem families ------------------------------------------------------------
# Each family: sentiments it supports, needs_friend, inciting sentences,
# middle sentences, protagonist lines, helper lines, endings by sentiment.
FAMILIES: Tuple[dict, ...] = (
    dict(
        name="lost", sent=("happy", "sad"), friend=False,
        start=("One {time}, {he} could not find {his} {toy}.",
               "{name} wanted to play with {his} {toy}, but it was gone!",
               "Then {name} saw that {his} {color} {toy} was missing.",
               "When {he} came home from the {place}, {his} {toy} was not there."),
        mid=("{He} {looked} under the {spot}.", "{He} {looked} behind the {spot}.",
             "{He} {looked} in the {room}, but it was not there.",
             "{He} asked {his} {parent} for help.",
             "{He} felt {sad} and worried.", "{He} searched the whole {room}.",
             "{He} checked every corner of the {place}.",
             "{He} tried to remember where {he} had left it."),
        plines=("Where is my {toy}?", "I can't find my {toy}!", "Have you seen my {toy}?",
                "I looked everywhere.", "I miss my {toy}."),
        hlines=("Let's look for it together.", "Did you look under the {spot}?",
                "Don't worry, we will find it.", "Where did you play with it last?",
                "Maybe it is hiding."),
        end=dict(
            happy=("At last, {he} found the {toy} {hide}. {He} gave it a big {hug}.",
                   "Then {he} saw something {color} {hide}. It was the {toy}! {He} was so {happy}.",
                   "{His} {parent} found the {toy} {hide}. {name} jumped for joy."),
            sad=("{He} never found {his} {toy}. {He} missed it very much.",
                 "The {toy} was gone for good. {name} {cried} a little before bed.",
                 "{He} looked until it was dark, but the {toy} was lost."),
        ),
    ),
    dict(
        name="broken", sent=("happy", "sad"), friend=False,
        start=("{He} was playing with {his} {toy} when it fell and broke.",
               "Oh no! {His} {toy} broke into two pieces.",
               "One {time}, {name} dropped {his} {color} {toy}, and it cracked."),
        mid=("{He} tried to fix it, but {he} could not.", "Tears ran down {his} face.",
             "{He} picked up the pieces {slowly}.", "{He} held the pieces in {his} hands.",
             "{He} showed the pieces to {his} {parent}.", "{He} tried some tape, but it did not stick."),
        plines=("My {toy} is broken!", "Can you fix it?", "It was my favorite {toy}.",
                "I didn't mean to drop it."),
        hlines=("Let me see.", "I think we can fix it.", "Accidents happen.",
                "Let's get some glue.", "It's okay to be sad."),
        end=dict(
            happy=("{His} {parent} got some glue and fixed the {toy}. It looked almost new!",
                   "Together they fixed the {toy}. {name} {laughed} and played with it all day."),
            sad=("The {toy} could not be fixed. {name} put the pieces in a box and said goodbye.",
                 "The {toy} was broken forever, and {name} felt {sad} all day."),
        ),
    ),
    dict(
        name="stuck", sent=("happy", "sad"), friend=False,
        start=("The wind blew {his} {stuck} {stuckplace}.",
               "{His} {stuck} got stuck {stuckplace}.",
               "{name} threw {his} {stuck} too hard, and it landed {stuckplace}."),
        mid=("{He} jumped, but {he} was too {small}.",
             "{He} tried to climb, but it was too high.",
             "{He} threw a stick, but {he} missed.",
             "{He} stood on a box, but {he} still could not reach it.",
             "{He} called for help."),
        plines=("My {stuck} is stuck!", "I can't reach it!", "Can you help me?",
                "How will I get it down?"),
        hlines=("I will help you.", "Let me try.", "Stand back, I have an {idea}.",
                "I am very tall, I can reach it."),
        end=dict(
            happy=("Then {helper} came by. {Hhe} reached up and got the {stuck} down. {name} said thank you.",
                   "{name} got a long stick and pushed the {stuck} down. {He} was so proud."),
            sad=("Nobody could reach the {stuck}. {name} had to go home without it.",
                 "The {stuck} stayed up there. {name} looked at it and felt {sad}."),
        ),
    ),
    dict(
        name="noise", sent=("scary",), friend=False,
        start=("That night, {he} heard a {loud} noise.",
               "{He} saw a {big} shadow on the wall.",
               "The room was very {dark}, and something went thump.",
               "When the lights went out, {name} heard a strange scratching sound."),
        mid=("{His} heart beat fast.", "{He} hid under {his} blanket.",
             "{He} wanted to call for {his} {parent}.",
             "The noise came again: bump, bump, bump!", "{He} was {very} {scared}.",
             "{He} held {his} teddy tight.", "{He} did not move at all.",
             "The shadow moved closer."),
        plines=("Who is there?", "I am scared!", "What was that?", "Please go away!",
                "Is it a monster?"),
        hlines=("Don't be scared.", "Let's go and look.", "I am here with you.",
                "There are no monsters here."),
        end=dict(
            scary=("{He} peeked out and saw that it was only {harmless}. {He} {laughed} and was not {scared} anymore.",
                   "{His} {parent} turned on the light. It was only {harmless}! {name} felt safe again.",
                   "Then {he} saw it. It was just {harmless}. {He} smiled and went back to sleep."),
        ),
    ),
    dict(
        name="lostplace", sent=("scary", "happy"), friend=False,
        start=("{name} {went} too far into the {woods} and got lost.",
               "At the {market}, {name} let go of {his} {parent}'s hand and got lost.",
               "{name} followed a butterfly and soon did not know the way home."),
        mid=("The trees all looked the same.", "It started to get {dark}.",
             "{He} heard an owl hoot.", "{He} called out, but nobody answered.",
             "{He} felt {very} alone.", "{He} walked in a circle.",
             "{He} tried to be brave."),
        plines=("Mom? Dad? Where are you?", "I want to go home.", "Which way is home?",
                "Help, I am lost!"),
        hlines=("Are you lost, little one?", "Follow me, I know the way.",
                "There you are! We were looking everywhere."),
        end=dict(
            scary=("Then {he} saw a light. It was {his} {parent} with a lamp! {He} ran and hugged {pthem}.",
                   "Just when {he} began to cry, {helper} showed {him} the way home. {He} was safe."),
            happy=("{helper} showed {him} the path, and soon {he} was home. {His} {parent} gave {him} a big {hug}.",
                   "{He} remembered the big red barn and followed it home. Everyone was {happy}."),
        ),
    ),
    dict(
        name="dog", sent=("scary",), friend=False,
        start=("A {big} dog ran toward {him}.", "Suddenly, a {big} black dog jumped out of the bushes.",
               "{name} heard a {loud} bark behind {him}."),
        mid=("{He} froze.", "The dog barked and barked.", "{He} wanted to run away.",
             "{His} legs were shaking.", "The dog came closer and closer."),
        plines=("Go away, dog!", "Please don't bite me!", "Help!"),
        hlines=("He is friendly, don't worry.", "Let him sniff your hand.", "He just wants to play."),
        end=dict(
            scary=("But the dog only wanted to play. It licked {his} hand and wagged its tail. {name} {laughed}.",
                   "The dog dropped a ball at {his} feet. It was not mean at all! {He} threw the ball, and they played."),
        ),
    ),
    dict(
        name="fight", sent=("angry", "happy", "sad"), friend=True,
        start=("{fname} took {name}'s {toy} and would not give it back.",
               "{name} and {fname} both wanted the {color} {toy}.",
               "{fname} knocked over the tower that {name} had built."),
        mid=("{name} pulled, and {fname} pulled.", "They both yelled.",
             "{name}'s face turned red.", "{fname} stuck out {fhis} tongue.",
             "Nobody wanted to say sorry.", "{name} stamped {his} feet."),
        plines=("That's mine!", "Give it back!", "You are not nice!", "I had it first!",
                "I don't want to play with you."),
        hlines=("No, it's mine now!", "I want it too!", "You never share!",
                "Let's take turns.", "I'm sorry."),
        end=dict(
            angry=("{name} was so {angry} that {he} went home. {He} did not play with {fname} for the rest of the day.",
                   "{name} crossed {his} arms and would not talk to {fname}. The day was ruined.",
                   "{name} shouted and ran away. {He} was still {angry} at bedtime."),
            happy=("Then they had an {idea}. They took turns, and soon they were both laughing.",
                   "{fname} said sorry, and {name} said sorry too. They played together and had fun."),
            sad=("The {toy} tore in half. Now nobody could play with it, and both of them {cried}.",),
        ),
    ),
    dict(
        name="try", sent=("happy", "sad"), friend=False, ordered=True,
        start=("{name} wanted to {goal}, but it was hard.",
               "Every {time}, {name} tried to {goal}.",
               "All the big kids could {goal}, and {name} wanted to learn too."),
        mid=("{He} tried once and fell.", "{He} tried again.", "{He} did not give up.",
             "{He} practiced every day.", "It was harder than it looked.",
             "{He} fell down and got back up.", "{He} watched the others carefully."),
        plines=("I can do it!", "This is too hard.", "Can you show me how?", "Watch me!",
                "One more time!"),
        hlines=("Keep trying!", "You are doing great.", "Don't give up.",
                "Go slow, and you will do it."),
        end=dict(
            happy=("Finally, {he} did it! {He} {goalpast} all by {himself}.",
                   "At last, {name} {goalpast}. Everyone cheered, and {he} felt proud."),
            sad=("{He} could not do it that day. {He} went home {tired} and {sad}.",
                 "In the end, {name} still could not {goal}. {He} sat down and {cried}."),
        ),
    ),
    dict(
        name="rain", sent=("happy", "sad", "angry"), friend=False,
        start=("{name} and {his} {parent} went to the {place} for a picnic. Then dark clouds came, and it started to rain.",
               "{name} was going to the {place}, but a {big} storm came and the trip was off.",
               "{name} wanted to play outside, but it was raining hard."),
        mid=("The rain fell and fell.", "{He} looked out the window.",
             "Everything was wet.", "{He} sat on the floor with a frown.",
             "Puddles grew bigger and bigger."),
        plines=("It's not fair!", "I wanted to play outside!", "When will the rain stop?",
                "Now we can't go!"),
        hlines=("We can play inside.", "The rain will stop soon.", "Let's play a game inside."),
        end=dict(
            happy=("They played games at home instead, and it was just as fun.",
                   "Then the sun came out, and a rainbow filled the sky. {name} {laughed} and jumped in the puddles."),
            sad=("The day was ruined. {name} looked out the window and felt {sad}.",
                 "The rain did not stop all day, and {name} went to bed {sad}."),
            angry=("{name} stamped {his} feet. {He} was {angry} at the rain and would not smile.",
                   "{name} kicked the wet sand. {He} was {angry} all the way home."),
        ),
    ),
    dict(
        name="shy", sent=("happy", "sad"), friend=False,
        start=("A new {kid2} came to the {place}.", "{name} saw a {kid2} sitting alone on a bench.",
               "There was a new {kid2} at school, and {name} wanted to say hello."),
        mid=("{name} wanted to say hello, but {he} was shy.", "{He} hid behind {his} {parent}.",
             "{His} cheeks turned pink.", "{He} took a small step forward."),
        plines=("Hello. Do you want to play?", "My name is {name}.", "Do you like {toys}?"),
        hlines=("Yes, I would love to!", "My name is {newname}.", "I like {toys} too!"),
        end=dict(
            happy=("Soon they were playing together. {name} had a new friend named {newname}.",
                   "They {activity_past} together all day. It was the start of a {good} friendship."),
            sad=("The new {kid2} left before {name} could say hello. {He} wished {he} had been braver.",),
        ),
    ),
    dict(
        name="hurt", sent=("happy", "sad"), friend=False,
        start=("{name} was running {fast} when {he} fell and hurt {his} knee.",
               "{name} slipped on a wet rock and scraped {his} hand.",
               "A bee stung {name} on the arm."),
        mid=("It hurt a lot.", "{He} {cried} and {cried}.", "There was a little blood.",
             "{He} limped to the bench."),
        plines=("Ouch! It hurts!", "I want my {parent}!", "Will it get better?"),
        hlines=("Let me see.", "You are very brave.", "A bandage will help."),
        end=dict(
            happy=("{His} {parent} put a bandage on it and gave {him} a kiss. Soon {he} felt better.",
                   "After a rest and a {yummy} {food}, {name} was ready to play again."),
            sad=("{He} could not play for the rest of the day. {He} sat and watched the others.",),
        ),
    ),
    dict(
        name="pet", sent=("happy", "sad"), friend=False,
        start=("{His} {pet} {petname} ran away.", "One {time}, the gate was open, and {petname} the {pet} was gone.",
               "{name} could not find {his} {pet} anywhere."),
        mid=("{He} called {petname} again and again.", "{He} put up signs on every {tree}.",
             "{He} {looked} {in_place}.", "{He} left a bowl of food by the door."),
        plines=("{petname}! Where are you?", "Come home, {petname}!", "Have you seen my {pet}?"),
        hlines=("I saw a {pet} by the {place}.", "We will find {petname}.", "Let's look together."),
        end=dict(
            happy=("At last, {petname} came running home. {name} hugged {petname} and never let go.",
                   "{petname} was sleeping {hide}! {name} {laughed} with joy."),
            sad=("{petname} did not come back that day. {name} sat by the window and waited.",),
        ),
    ),
    dict(
        name="help", sent=("happy", "sad"), friend=False,
        start=("{name} found a {small} {bird} with a hurt wing.", "{name} saw an old lady who dropped all her apples.",
               "A {small} {animal} was stuck in a hole, and {name} wanted to help."),
        mid=("{He} was very gentle.", "{He} made a soft bed of leaves.", "{He} gave it some water.",
             "{He} worked hard to help."),
        plines=("Don't worry, I will help you.", "Are you okay?", "Here, let me help."),
        hlines=("Thank you, you are so kind.", "You have a good heart.", "That was very nice of you."),
        end=dict(
            happy=("Soon it was well again and flew up into the sky. {name} waved goodbye with a smile.",
                   "Everyone said thank you. {name} felt warm inside because {he} had helped."),
            sad=("One morning it flew away and never came back. {name} missed it very much.",),
        ),
    ),
    dict(
        name="no", sent=("angry", "happy"), friend=False,
        start=("{name} wanted a {treat}, but {his} {parent} said no.",
               "{name} wanted to stay up late, but it was bedtime.",
               "{name} wanted to go to the {place}, but {his} {parent} was too busy."),
        mid=("{name} {cried} and shouted.", "{He} stamped {his} feet.",
             "{He} sat on the floor and would not move.", "{He} made a grumpy face."),
        plines=("But I want it!", "That's not fair!", "Please, please, please?", "I am so mad!"),
        hlines=("Not today.", "No means no.", "Maybe tomorrow.", "Shouting will not help."),
        end=dict(
            angry=("{name} crossed {his} arms and stayed {angry} all afternoon.",
                   "{name} went to {his} room and slammed the door. {He} was {very} {angry}."),
            happy=("Later, {his} {parent} gave {him} a {yummy} {food} instead, and {he} liked it.",
                   "{name} calmed down and said sorry. Then they read a book together."),
        ),
    ),
)

MORALS = dict(
    happy=("From that day on, {name} always remembered to {lesson}.",
           "{name} learned that it is good to {lesson}.",
           "It was the best day ever.",
           "{He} smiled and went to sleep, {happy} and warm.",
           "And they all lived happily ever after.",
           "{name} would never forget this {good} day."),
    sad=("The end.", "{He} hoped tomorrow would be a better day.",
         "Sometimes things do not go the way we want.",
         "{name} went to bed with a heavy heart."),
    scary=("{name} learned that not everything in the {dark} is scary.",
           "After that, {he} was not so {scared} anymore.",
           "{He} felt brave and fell fast asleep.",
           "Now {he} knew there was nothing to fear."),
    angry=("Nobody said sorry that day.", "{He} did not want to share ever again.",
           "The end.", "{He} was still {angry} when {he} went to bed."),
)
LESSONS = ("share", "be kind", "never give up", "ask for help", "be careful",
           "tell the truth", "help others", "be patient", "say sorry",
           "listen to {his} {parent}", "try new things", "be brave")

REFRAINS = (
    "{He} tried and tried and tried.",
    "Up, up, up went the {toy}.",
    "Hop, hop, hop went the {small} {kind}.",
    "{name} looked here, and {name} looked there.",
    "Step, step, step, {he} walked on.",
    "Knock, knock, knock went the door.",
    "Round and round and round {he} went.",
    "Splash, splash, splash went the rain.",
)
DIALOGUE_REFRAINS = (
    "\"I can do it, I can do it!\" said {name}.",
    "\"Not yet, not yet,\" said {name}.",
    "\"One more time!\" said {name}.",
)

# short coherent scenes used as setup in longer stories
SCENES = (
    ("One {weather} {daytime}, {name} {went} to the {place} with {his} {parent}.",
     "They brought a basket of {foods}.",
     "{name} " + "{activity_past}" + " while {his} {parent} read a book.",
     "It was a {good} day.", "Later, they sat in the shade and ate {a_food}."),
    ("In the morning, {name} woke up early.", "{He} ate {a_food} for breakfast.",
     "Then {he} put on {his} {color} boots.", "{He} was ready for a {big} day.",
     "{He} ran outside and waved to the {bird_pl}."),
    ("The {place} was {pretty}.", "There were {flower_pl} and tall {tree_pl}.",
     "A {small} stream ran by with cold, clear water.", "{name} loved it there.",
     "{He} came every day after lunch."),
    ("On the way, {he} saw a {sc_a} and a {sc_b}.",
     "The {sc_b} made a funny noise, and {name} {laughed}.",
     "{He} said hello to everyone {he} met.", "Then {he} skipped along the path.",
     "Soon {he} came to a {small} bridge."),
    ("{name} had a {small} garden behind the {house}.",
     "{He} grew carrots, beans, and {flower_pl}.", "Every day, {he} gave the plants water.",
     "The plants grew taller and taller.", "{He} was proud of {his} garden."),
    ("It was {name}'s birthday.", "{His} {parent} made a {big} cake with {color} icing.",
     "There were balloons and presents.", "{name} wore a party hat.",
     "Everyone sang a song for {him}."),
)
FRIEND_MIDS = ("{fname} came over to help.", "{fname} held {his} hand.",
               "{fname} had an {idea}.", "{fname} looked worried too.",
               "{name} and {fname} sat down to think.", "{fname} gave {him} a {hug}.")
AFTERMATH = dict(
    happy=("That night, {he} told {his} {parent} all about it.",
           "{His} {parent} smiled and tucked {him} into bed.",
           "{name} could not stop smiling."),
    sad=("That night, {he} did not want any dinner.", "{His} {parent} sat with {him} for a while.",
         "{name} hugged {his} pillow."),
    scary=("{His} heart slowed down.", "{He} {laughed} at how silly {he} had been.",
           "{His} {parent} gave {him} a warm glass of milk."),
    angry=("{His} face was still red.", "{He} would not eat {his} dinner.",
           "{He} kicked a stone all the way home."),
)

CLOSING_LINES = dict(
    happy=("This is the best day ever!", "Thank you so much! I am so happy.",
           "Can we do it again tomorrow?", "I love you, and I love this day."),
    sad=("I miss it so much.", "I wish things were different.", "Maybe tomorrow will be better."),
    scary=("I'm not scared anymore!", "That was silly of me. It was nothing at all!",
           "Next time I will be brave."),
    angry=("I am never playing with you again!", "Hmph! Leave me alone!", "It's not fair, and I am still mad!"),
)

_KID2 = ("girl", "boy", "kid", "puppy", "kitten", "bunny", "duckling")

# -----------------------------------------------------------------------------
# helpers (all randomness goes through rng.random())


def _pick(rng: random.Random, seq: Sequence):
    return seq[int(rng.random() * len(seq))]


def _weighted(rng: random.Random, pairs: Sequence[Tuple[str, float]]) -> str:
    total = sum(w for _, w in pairs)
    x = rng.random() * total
    for k, w in pairs:
        x -= w
        if x < 0:
            return k
    return pairs[-1][0]


def _randint(rng: random.Random, a: int, b: int) -> int:
    return a + int(rng.random() * (b - a + 1))


def _shuffled(rng: random.Random, seq: Sequence) -> list:
    out = list(seq)
    for i in range(len(out) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        out[i], out[j] = out[j], out[i]
    return out


def _sample(rng: random.Random, seq: Sequence, k: int) -> list:
    """k distinct items in random order (partial Fisher-Yates)."""
    out = list(seq)
    n = len(out)
    k = min(k, n)
    for i in range(k):
        j = i + int(rng.random() * (n - i))
        out[i], out[j] = out[j], out[i]
    return out[:k]


def _plural(word: str) -> str:
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    if word.endswith(("ch", "sh", "s", "x")) or word in ("tomato", "potato"):
        return word + "es"
    return word + "s"


_AT = {"beach", "zoo", "library", "market", "school", "circus", "fair", "bakery", "museum",
       "seaside", "harbor", "campsite", "playground", "lake", "pond", "river"}
_ON = {"farm", "hill", "island", "mountain"}


def _in_place(place: str) -> str:
    return ("at" if place in _AT else "on" if place in _ON else "in") + " the " + place


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


_PRON = {
    "he": dict(he="he", him="him", his="his", himself="himself"),
    "she": dict(he="she", him="her", his="her", himself="herself"),
    "it": dict(he="it", him="it", his="its", himself="itself"),
    "they": dict(he="they", him="them", his="their", himself="themselves"),
}


class _Ctx(dict):
    """format_map mapping: fixed slots from the dict; unknown slots resolved
    lazily from the word lists, drawing from the story rng."""

    def __init__(self, rng, rich, **kw):
        super().__init__(**kw)
        self.rng = rng
        self.rich = rich

    def __missing__(self, key):
        rng = self.rng
        if key.endswith("_pl"):
            return _plural(self[key[:-3]])
        if key in LEX:
            simple, rich = LEX[key]
            return _pick(rng, rich) if (self.rich and rng.random() < 0.75) else _pick(rng, simple)
        if key == "peeked":
            return _pick(rng, ("peeked", "peered", "poked its head"))
        if key == "food":
            return _pick(rng, FOODS)
        if key == "foods":
            return _plural(_pick(rng, FOODS))
        if key == "a_food":
            f = _pick(rng, FOODS)
            return _article(f) + " " + f
        if key == "animal2":
            return _pick(rng, ANIMALS[::-1])
        if key == "toy2":
            return _pick(rng, TOYS)
        if key == "clothes":
            return _pick(rng, CLOTHES)
        if key == "daytime":
            return _pick(rng, ("morning", "afternoon", "day"))
        if key == "weather":
            return _pick(rng, WEATHER)
        if key == "color":
            return _pick(rng, COLORS)
        if key == "animal":
            return _pick(rng, ANIMALS)
        if key == "spot":
            return _pick(rng, SPOTS)
        if key == "hide":
            return _pick(rng, HIDES)
        if key == "room":
            return _pick(rng, ROOMS)
        if key == "harmless":
            return _pick(rng, HARMLESS)
        if key == "warm":
            return _pick(rng, ("warm", "bright", "hot")) if not self.rich else _pick(rng, WEATHER[:2] + ("golden", "glowing"))
        if key == "time":
            return _pick(rng, TIMES)
        if key == "woods":
            return _pick(rng, ("woods", "forest", "jungle", "tall grass"))
        if key == "market":
            return _pick(rng, ("market", "fair", "zoo", "big store", "beach"))
        if key == "treat":
            return _pick(rng, TREATS)
        if key == "lesson":
            return _pick(rng, LESSONS)
        if key == "toys":
            return _plural(_pick(rng, TOYS))
        if key == "kid2":
            return _pick(rng, _KID2)
        if key == "activity_past":
            return _pick(rng, ACTIVITIES)[1]
        raise KeyError(key)


def _fill(template: str, ctx: _Ctx) -> str:
    s = template
    for _ in range(3):
        if "{" not in s:
            break
        s = s.format_map(ctx)
    return s


def _cap(s: str) -> str:
    if s[:1].isupper():
        return s
    for i, ch in enumerate(s):
        if ch.isalpha():
            return s[:i] + ch.upper() + s[i + 1:]
    return s


_LOWERABLE = {"He", "She", "It", "They", "The", "A", "An", "His", "Her", "Its",
              "Their", "Then", "Soon", "There", "Everyone", "Nobody", "Some", "Clouds"}
_CONNECTORS = (", and ", ", and ", ", and ", " and then ", ". Then ", ", and soon ")

# -----------------------------------------------------------------------------
# story construction


def _make_cast(rng: random.Random, style: StoryStyle) -> dict:
    kind = _weighted(rng, style.cast_weights)

    def child(gender):
        if rng.random() < style.accented_name_share:
            return _pick(rng, ACCENTED_GIRLS if gender == "she" else ACCENTED_BOYS)
        return _pick(rng, GIRL_NAMES if gender == "she" else BOY_NAMES)

    if kind == "animal":
        pron = _weighted(rng, style.animal_pronoun_weights)
        noun = _pick(rng, ANIMALS)
        name = _pick(rng, ANIMAL_NAMES) if rng.random() < 0.8 else child(pron if pron != "it" else "she")
        parent = _pick(rng, ANIMAL_PARENTS)
        parent = (parent[0] + " " + noun, parent[1])
    else:
        if kind == "mixed":  # girl + boy pair; slightly more often led by the girl
            pron = "he" if rng.random() < 0.45 else "she"
        else:
            pron = "she" if kind == "girl" else "he"
        noun = "girl" if pron == "she" else "boy"
        name = child(pron)
        parent = _pick(rng, PARENTS)
    # friend: mixed pairs always get an other-gender friend; others sometimes
    if kind == "mixed":
        fpron = "he" if pron == "she" else "she"
    elif kind == "animal":
        fpron = _weighted(rng, style.animal_pronoun_weights)
        if fpron == "it":
            fpron = "he" if rng.random() < 0.5 else "she"
    else:
        fpron = pron if rng.random() < 0.75 else ("he" if pron == "she" else "she")
    if kind == "animal":
        fnoun = _pick(rng, ANIMALS)
        fname = _pick(rng, ANIMAL_NAMES)
        if fname == name:
            fname = _pick(rng, ANIMAL_NAMES[::-1])
        fname = fname if fname != name else "Pip" if name != "Pip" else "Dash"
    else:
        fnoun = "girl" if fpron == "she" else "boy"
        fname = child(fpron)
        while fname == name:
            fname = child(fpron)
    return dict(kind=kind, pron=pron, noun=noun, name=name, parent=parent,
                fpron=fpron, fnoun=fnoun, fname=fname,
                has_friend=(kind == "mixed" or rng.random() < 0.3))


def _openings(rng, ctx, cast, once, rich) -> List[str]:
    """1-2 opening sentences introducing the main character."""
    adj = _pick(rng, TRAITS_RICH if rich else TRAITS_SIMPLE)
    size = "little" if rng.random() < 0.6 else ctx["small"]
    noun = cast["noun"]
    name = cast["name"]
    nameless = cast["kind"] == "animal" and cast["pron"] == "it" and rng.random() < 0.5
    if nameless:
        desc = f"{size} {noun}"  # nameless "it" animal: "the frog" in the story
        ctx["name"] = ctx["Name"] = name = "the " + noun
    else:
        desc = _pick(rng, (f"{size} {noun} named {name}", f"{adj} {noun} named {name}",
                           f"{size} {noun} called {name}", f"{adj} {size} {noun} named {name}"))
    a_desc = _article(desc) + " " + desc
    pair = cast["has_friend"] and cast["kind"] == "mixed" and rng.random() < 0.5
    if once:
        if pair:
            return [f"Once upon a time, there were two friends named {name} and {cast['fname']}."]
        return [_pick(rng, (
            f"Once upon a time, there was {a_desc}.",
            f"Once upon a time, in a {{small}} {{town}}, there lived {a_desc}.",
            f"Once upon a time, there was {a_desc} who lived by a {{big}} {{tree}}.",
            f"Once upon a time, {a_desc} lived near a {{big}} {_pick(rng, PLACES)}.",
        ))]
    if pair:
        return [_pick(rng, (f"{name} and {cast['fname']} were best friends.",
                            f"{name} and {cast['fname']} lived next door to each other."))]
    opts = (
        [f"One day, {a_desc} {{went}} to the {{place}}."],
        [f"There was once {a_desc}."],
        [f"Long ago, there lived {a_desc}."],
        [f"In a {{big}} {_pick(rng, PLACES)}, there lived {a_desc}."],
        [f"It was a {_pick(rng, WEATHER)} {{time}}.", f"{_cap(a_desc)} wanted to go outside."],
        [f"{name} was {_article(adj)} {adj} {noun}."],
        [f"Once there was {a_desc}."],
        [f"{name} was {_article(adj)} {adj} {noun} who loved the {{place}}."],
    )
    if nameless:
        opts = opts[:5]  # only openings that introduce it through a_desc
    return list(_pick(rng, opts))


def _dialogue(rng, ctx, speaker: str, line: str, rich: bool) -> str:
    line = _cap(_fill(line, ctx))
    if line.endswith("?"):
        verb = _pick(rng, ("asked", "asked", "wondered")) if rich else "asked"
    elif line.endswith("!"):
        verb = _pick(rng, ("shouted", "cried", "exclaimed", "yelled")) if rich else _pick(rng, ("said", "shouted"))
    else:
        verb = _pick(rng, ("said", "replied", "whispered", "answered", "explained")) if rich else "said"
    r = rng.random()
    if r < 0.45:
        body = line[:-1] + "," if line.endswith(".") else line
        tag_first = speaker[:1].isupper() and rng.random() < 0.5
        return f"\"{body}\" {verb} {speaker}." if tag_first else f"\"{body}\" {speaker} {verb}."
    if r < 0.9:
        return f"{_cap(speaker)} {verb}, \"{line}\""
    return f"\"{line}\""  # bare line, speaker clear from context


def _make_story(rng: random.Random, style: StoryStyle) -> Tuple[str, dict]:
    """One story and its labels. The steps below draw from rng in a fixed order (the
    sample is deterministic for a seed: reorder nothing)."""
    cast = _make_cast(rng, style)
    d = _draw_features(rng, style)
    fam = _pick(rng, [f for f in FAMILIES if d["sentiment"] in f["sent"]])
    if fam["friend"]:
        cast["has_friend"] = True
    ctx, helper, act, toy = _story_context(rng, cast, d["rich"])
    opening = [_fill(s, ctx) for s in _openings(rng, ctx, cast, d["once"], d["rich"])]
    setup_pool = _setup_pool(rng, ctx, cast, act, toy, d["rich"])
    n_moral, n_dial, n_setup, n_mid = _budget(rng, d["target"], len(opening), d["dialogue"])
    setup, start_sents = _setup_and_start(rng, ctx, fam, setup_pool, n_setup)
    mids = _middle(rng, ctx, fam, cast, d, n_mid)
    dials = _dialogues(rng, ctx, cast, fam, helper, d, n_dial)
    end = _split_sents(_fill(_pick(rng, fam["end"][d["sentiment"]]), ctx))
    morals = _morals(rng, ctx, d, n_moral)
    body = _interleave(rng, mids, dials)
    if cast["has_friend"] and not any(cast["fname"] in x for x in opening + setup):
        body.insert(0, _fill(_pick(rng, ("{His} friend {fname} was with {him}.",
                                         "{fname} was there too.",
                                         "{name} was playing with {his} friend {fname}.")), ctx))
    if d["rich"]:
        body = [(_pick(rng, OPENERS_RICH) + s[0].lower() + s[1:])
                if (not s.startswith('"') and rng.random() < 0.2 and s.split(" ", 1)[0] in _LOWERABLE) else s
                for s in body]
    text = _assemble(rng, [opening + setup, start_sents + body, end + morals], d)
    meta = dict(cast=cast["kind"], pronoun=cast["pron"], friend_pronoun=cast["fpron"] if cast["has_friend"] else None,
                family=fam["name"], sentiment=d["sentiment"], dialogue=d["dialogue"], length=d["length"],
                target_sentences=d["target"], rich_vocab=d["rich"], compound=d["compound"], once_upon=d["once"],
                refrain=d["refrain"], paragraphs=("\n\n" in text), curly=d["curly"])
    return text, meta


def _draw_features(rng: random.Random, style: StoryStyle) -> dict:
    """The story's switches, drawn from the style's shares and weights."""
    d = dict(rich=rng.random() < style.rich_vocab_share, compound=rng.random() < style.compound_share,
             once=rng.random() < style.once_upon_share, dialogue=_weighted(rng, style.dialogue_weights),
             length=_weighted(rng, style.length_weights), sentiment=_weighted(rng, style.sentiment_weights),
             refrain=rng.random() < style.refrain_share, paragraphs=rng.random() < style.paragraph_share,
             curly=rng.random() < style.unicode_share)
    d["target"] = _randint(rng, *{"short": (3, 6), "medium": (8, 17), "long": (18, 28)}[d["length"]])
    return d


def _story_context(rng: random.Random, cast: dict, rich: bool):
    """(the fill-in context, helper, activity, toy) of one story."""
    p = _PRON[cast["pron"]]
    fp = _PRON[cast["fpron"]]
    parent, ppron = cast["parent"]
    helper, hpron = _pick(rng, HELPERS)
    toy = _pick(rng, TOYS)
    goal = _pick(rng, GOALS)
    act = _pick(rng, ACTIVITIES)
    place = _pick(rng, PLACES)
    pet = _pick(rng, ("dog", "cat", "puppy", "kitten", "bunny", "hamster", "parrot", "turtle"))
    ctx = _Ctx(
        rng, rich,
        name=cast["name"], Name=cast["name"], fname=cast["fname"], kind=cast["noun"],
        he=p["he"], He=_cap(p["he"]), him=p["him"], his=p["his"], His=_cap(p["his"]),
        himself=p["himself"], fhe=fp["he"], fhis=fp["his"], fhim=fp["him"],
        parent=parent, pthem=_PRON[ppron]["him"], helper=helper, Hhe=_cap(_PRON[hpron]["he"]),
        toy=toy, place=place, in_place=_in_place(place), stuck=_pick(rng, STUCK_THINGS),
        stuckplace=_pick(rng, STUCK_PLACES), goal=goal[0], goalpast=goal[1],
        pet=pet, petname=_pick(rng, ANIMAL_NAMES), newname=_pick(rng, GIRL_NAMES + BOY_NAMES),
        activity=act[0], activity_ing=act[2],
        sc_a=_pick(rng, ANIMALS[:25]), sc_b=_pick(rng, ANIMALS[25:]),
    )
    return ctx, helper, act, toy


def _setup_pool(rng: random.Random, ctx, cast: dict, act, toy: str, rich: bool) -> List[str]:
    """Descriptive sentences to set the scene from (and the story's {a_toy})."""
    pool = [
        "{He} loved to {activity}.",
        "Every day, {he} " + act[1] + " {in_place}.",
        "{His} favorite toy was {a_toy}.",
        "{He} had {a_toy} that {he} loved {very} much.",
        "{He} lived with {his} {parent} in a {small} {house}.",
        "{name} liked " + act[2] + " more than anything.",
        "{He} was always {happy} when the sun was out.",
        "{name} liked {foods} best of all.",
    ]
    if rich:
        pool += ["{He} had " + _pick(rng, ("blue", "brown", "green", "gray", "bright", "sparkling")) + " eyes and a {big}, {good} smile.",
                 "{He} was the most " + _pick(rng, TRAITS_RICH) + " " + cast["noun"] + " in the whole {town}."]
    if cast["has_friend"] and cast["kind"] != "mixed":
        pool.append("{He} had a friend named {fname}.")
    elif cast["has_friend"]:
        pool.append("{name} had a friend named {fname}, and they played every day.")
    a_toy_adj = _pick(rng, COLORS)
    ctx["a_toy"] = f"{_article(a_toy_adj)} {a_toy_adj} {toy}"
    return pool


def _budget(rng: random.Random, target: int, n_opening: int, dlevel: str) -> Tuple[int, int, int, int]:
    """(morals, dialogue lines, setup and middle sentences): opening + start + end are
    fixed; the rest of the target length is shared out."""
    budget = max(0, target - n_opening - 2)
    n_moral = 0 if budget == 0 else (1 if budget < 6 else _randint(rng, 1, 2) if budget < 14 else _randint(rng, 2, 4))
    if dlevel == "mostly":
        n_moral = 0 if budget < 8 else 1
    budget -= n_moral
    if dlevel == "none":
        n_dial = 0
    elif dlevel == "some":
        n_dial = min(budget, _randint(rng, 1, 3))
    else:
        n_dial = max(2, int(budget * (0.75 + 0.25 * rng.random()))) if budget >= 2 else budget
    budget -= n_dial
    n_setup = min(budget, _randint(rng, 0, 3) if target < 12 else _randint(rng, 2, 6))
    return n_moral, n_dial, n_setup, budget - n_setup


def _setup_and_start(rng: random.Random, ctx, fam: dict, setup_pool: List[str], n_setup: int):
    """(setup sentences, the sentences of the problem's start)."""
    n_desc = min(n_setup, _randint(rng, 1, 2)) if n_setup else 0
    setup = [_fill(s, ctx) for s in _sample(rng, setup_pool, n_desc)]
    scene = _pick(rng, SCENES)
    setup += [_fill(s, ctx) for s in scene[:n_setup - n_desc]]
    # "one day" transition keeps the problem from starting abruptly
    start = _fill(_pick(rng, fam["start"]), ctx)
    if n_setup and rng.random() < 0.5 and not start.startswith(
            ("One ", "Then", "When", "Every", "All ", "At ", "A new", "Oh", "Suddenly", "That ")):
        lead = _pick(rng, ("One day, ", "Then one day, ", "But one day, ", "The next morning, "))
        first = start.split(" ", 1)[0]
        start = lead + (start[0].lower() + start[1:] if first in _LOWERABLE else start)
    return setup, _split_sents(start)


def _middle(rng: random.Random, ctx, fam: dict, cast: dict, d: dict, n_mid: int) -> List[str]:
    """The middle sentences: the family's events, fillers and an optional refrain."""
    if fam.get("ordered"):
        mid_pool = list(fam["mid"])[::-1]  # popped from the end: keeps the written order
    else:
        mid_pool = list(_shuffled(rng, fam["mid"]))
    if cast["has_friend"]:
        extra = _sample(rng, FRIEND_MIDS, _randint(rng, 1, 3))
        mid_pool = extra + mid_pool if fam.get("ordered") else _shuffled(rng, mid_pool + extra)
    fillers = list(FILLERS) + (list(FILLERS_RICH) if d["rich"] else [])
    mids: List[str] = []
    refrain_line = None
    if d["refrain"]:
        if d["dialogue"] != "none" and rng.random() < 0.4:
            refrain_line = _fill(_pick(rng, DIALOGUE_REFRAINS), ctx)
        else:
            refrain_line = _fill(_pick(rng, REFRAINS), ctx)
    filler_order = _sample(rng, fillers, n_mid)
    fi = 0
    for k in range(n_mid):
        if refrain_line and k % 2 == 1:
            mids.append(refrain_line)
            continue
        if mid_pool and (rng.random() < 0.85 or fi >= len(filler_order)):
            mids.append(_fill(mid_pool.pop(), ctx))
        elif fi < len(filler_order):
            mids.append(_fill(filler_order[fi], ctx))
            fi += 1
        else:
            mids.append(_fill(_pick(rng, fam["mid"]), ctx))
    if refrain_line and mids.count(refrain_line) < 2:
        mids = mids[:1] + [refrain_line] + mids[1:] + [refrain_line]
    return mids


def _dialogues(rng: random.Random, ctx, cast: dict, fam: dict, helper: str, d: dict, n_dial: int) -> List[str]:
    """Dialogue lines, alternating the protagonist and another speaker."""
    name = ctx["name"]
    if cast["has_friend"]:
        other = cast["fname"]
    elif fam["name"] == "stuck":
        other = "the " + helper.split(" ", 1)[1] if helper.startswith(("a ", "an ")) else helper
    else:
        other = "{his} {parent}" if cast["kind"] != "animal" else "{his} " + ctx["parent"]
    other = _fill(other, ctx)
    plines = list(fam["plines"]) + [
        "Look at that!", "Wow, I did not know that.", "Okay, I will try.", "Thank you!",
        "What should I do now?", "Really? Do you think so?", "Yes, let's do it!",
        "I know what to do!", "I feel a little better now.", "Will you stay with me?"]
    hlines = list(fam["hlines"]) + [
        "Be careful, please.", "You can do it, I know you can.", "Come here, little one.",
        "What is wrong? You look upset.", "I am proud of you.", "Let's go and see.",
        "Take a deep breath and count to three.", "I will always help you."]
    if n_dial:
        plines = _shuffled(rng, plines[:len(fam["plines"])]) + _shuffled(rng, plines[len(fam["plines"]):])
        hlines = _shuffled(rng, hlines[:len(fam["hlines"])]) + _shuffled(rng, hlines[len(fam["hlines"]):])
    dials: List[str] = []
    pi = hi = 0
    for k in range(n_dial):
        # in mostly-dialogue stories a turn often holds two lines
        nl = 2 if (d["dialogue"] == "mostly" and rng.random() < 0.5) else 1
        if k % 2 == 0:
            line = " ".join(plines[(pi + j) % len(plines)] for j in range(nl))
            pi += nl
            spk = name
        else:
            line = " ".join(hlines[(hi + j) % len(hlines)] for j in range(nl))
            hi += nl
            spk = other
        dials.append(_dialogue(rng, ctx, spk, line, d["rich"]))
    return dials


def _morals(rng: random.Random, ctx, d: dict, n_moral: int) -> List[str]:
    sentiment = d["sentiment"]
    n_after = min(n_moral - 1, 3) if n_moral > 1 else 0
    morals = [_fill(m, ctx) for m in AFTERMATH[sentiment][:n_after]]
    morals += [_fill(m, ctx) for m in _sample(rng, MORALS[sentiment], n_moral - n_after)]
    if d["dialogue"] == "mostly":
        morals.append(_dialogue(rng, ctx, ctx["name"], _pick(rng, CLOSING_LINES[sentiment]), d["rich"]))
    return morals


def _interleave(rng: random.Random, mids: List[str], dials: List[str]) -> List[str]:
    """The middle with the dialogue lines placed after random middle sentences."""
    if not dials:
        return list(mids)
    if not mids:
        return list(dials)
    slots = sorted(int(rng.random() * (len(mids) + 1)) for _ in range(len(dials)))
    merged, di = [], 0
    for i in range(len(mids) + 1):
        while di < len(dials) and slots[di] == i:
            merged.append(dials[di])
            di += 1
        if i < len(mids):
            merged.append(mids[i])
    return merged


def _assemble(rng: random.Random, sections: List[List[str]], d: dict) -> str:
    """The sections as text: merged into compound sentences, capitalised, in paragraphs
    or one, 'a' -> 'an' before a vowel, curly quotes."""
    if d["compound"]:
        sections = [_merge(rng, sec) for sec in sections]
    sections = [[_cap(s) for s in sec] for sec in sections if sec]
    if d["paragraphs"] and sum(len(s) for s in sections) >= 5:
        text = "\n\n".join(" ".join(sec) for sec in sections)
    else:
        text = " ".join(" ".join(sec) for sec in sections)
    for v in "aeiou":
        text = text.replace(" a " + v, " an " + v).replace("A " + v, "An " + v)
    return _curlify(text) if d["curly"] else text


def _split_sents(s: str) -> List[str]:
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Za-z])", s)
    return [x for x in parts if x]


def _merge(rng: random.Random, sents: List[str]) -> List[str]:
    out: List[str] = []
    i = 0
    while i < len(sents):
        s = sents[i]
        if (i + 1 < len(sents) and rng.random() < 0.5 and s.endswith(".") and '"' not in s
                and sents[i + 1] != "The end."
                and '"' not in sents[i + 1] and len(s) < 90 and s.count(",") < 2):
            nxt = sents[i + 1]
            first, _, rest = nxt.partition(" ")
            if first in _LOWERABLE and rest:
                conn = _pick(rng, _CONNECTORS)
                if conn == ". Then ":
                    out.append(s[:-1] + ". Then " + first.lower() + " " + rest)
                else:
                    out.append(s[:-1] + conn + first.lower() + " " + rest)
                i += 2
                continue
        out.append(s)
        i += 1
    return out


def _curlify(text: str) -> str:
    out = []
    open_q = True
    for ch in text:
        if ch == '"':
            out.append("\u201c" if open_q else "\u201d")
            open_q = not open_q
        elif ch == "'":
            out.append("\u2019")
        else:
            out.append(ch)
    return "".join(out)


# -----------------------------------------------------------------------------
# public API


def generate_story_records(n: int, seed: int = SEED, style: StoryStyle = DEFAULT_STYLE) -> List[dict]:
    """n dicts {"story": text, **style labels} (ground-truth knobs used per story)."""
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text, meta = _make_story(rng, style)
        meta["story"] = text
        out.append(meta)
    return out


def generate_stories(n: int, seed: int = SEED, style: StoryStyle = DEFAULT_STYLE) -> List[str]:
    """n stories, deterministic for (n, seed, style): the same list on every run,
    machine and Python version. Prefix-stable: the first k stories do not depend on n."""
    return [r["story"] for r in generate_story_records(n, seed, style)]


_WORD_RE = re.compile(r"[A-Za-z\u00c0-\u024f]+(?:['\u2019-][A-Za-z]+)*")
_SENT_RE = re.compile(r"[.!?]+[\"\u201d]?(?=\s|$)")
_QUOTE_RE = re.compile(r"[\"\u201c]([^\"\u201d]*)[\"\u201d]")
_HE = {"he", "him", "his", "himself"}
_SHE = {"she", "her", "hers", "herself"}


def story_features(text: str) -> dict:
    """Cheap surface statistics of one story (words, sentences, dialogue share,
    type-token ratio, he/she pronoun counts)."""
    words = [w.lower() for w in _WORD_RE.findall(text)]
    n_words = len(words)
    n_sents = max(1, len(_SENT_RE.findall(text)))
    quoted = sum(len(_WORD_RE.findall(q)) for q in _QUOTE_RE.findall(text))
    return dict(
        n_words=n_words,
        n_sentences=n_sents,
        words_per_sentence=n_words / n_sents,
        type_token_ratio=(len(set(words)) / n_words) if n_words else 0.0,
        dialogue_share=(quoted / n_words) if n_words else 0.0,
        n_he=sum(w in _HE for w in words),
        n_she=sum(w in _SHE for w in words),
        n_paragraphs=text.count("\n\n") + 1,
    )


if __name__ == "__main__":
    import sys
    k = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    s = int(sys.argv[2]) if len(sys.argv) > 2 else SEED
    for story in generate_stories(k, s):
        print(story)
        print("-" * 60)


# -----------------------------------------------------------------------------
# noise on purpose: a test bed for batch selection where the answer is known

NOISE_KINDS = ("shuffled", "random", "repeat", "truncate")


def corrupt(story: str, kind: str, rng: random.Random) -> str:
    """A corrupted version of a story, of one of NOISE_KINDS:
    shuffled  its words in a random order (fluent words, no syntax)
    random    as many random lowercase 'words' (2-8 letters) as it has words
    repeat    one of its sentences repeated until the story's length
    truncate  its first 10-30% of characters, cut mid-word"""
    words = story.split()
    if kind == "shuffled":
        rng.shuffle(words)
        return " ".join(words)
    if kind == "random":
        letters = "abcdefghijklmnopqrstuvwxyz"
        return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in words)
    if kind == "repeat":
        sents = [s for s in re.split(r"(?<=[.!?])\s+", story) if s.strip()] or [story]
        s = rng.choice(sents)
        return " ".join([s] * max(2, len(story) // max(len(s) + 1, 1)))
    if kind == "truncate":
        return story[:max(1, int(len(story) * rng.uniform(0.1, 0.3)))]
    raise ValueError(f"unknown noise kind {kind!r}; choose one of {', '.join(NOISE_KINDS)}")


def noise_plan(n_train: int, noise: float, seed: int) -> dict[int, str]:
    """{index among the training stories: noise kind} for round(noise * n_train) of them,
    chosen and assigned kinds (in turn) from a seeded generator."""
    rng = random.Random(f"noise:{seed}:{noise}")
    chosen = sorted(rng.sample(range(n_train), round(noise * n_train)))
    return {i: NOISE_KINDS[k % len(NOISE_KINDS)] for k, i in enumerate(chosen)}
