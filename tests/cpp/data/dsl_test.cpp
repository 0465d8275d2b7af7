// FLOWROLL/DIMMATCH generator and grammar checker. References: the grammar of docs/dsl.md as
// written out in the expectations below, and the phrase tables of the spec.
#include <map>
#include <regex>
#include <set>

#include <gtest/gtest.h>

#include "scaletrain/data/dsl.h"

namespace scaletrain::data {
namespace {

const std::vector<DslTask> kBoth = {DslTask::flowroll, DslTask::dimmatch};

TEST(Dsl, SameSeedSameStreamOtherSeedOtherStream) {
  DslGenerator a(7, kBoth), b(7, kBoth), c(8, kBoth);
  int differ = 0;
  for (int i = 0; i < 200; ++i) {
    auto x = a.next(), y = b.next(), z = c.next();
    EXPECT_EQ(x.request, y.request);
    EXPECT_EQ(x.program, y.program);
    differ += x.request != z.request;
  }
  EXPECT_GT(differ, 190);
}

TEST(Dsl, StreamIsPinnedAcrossPlatforms) {
  // The generator uses its own integer RNG, so these stay fixed on every platform and compiler.
  Rng rng(42);
  EXPECT_EQ(rng.next(), 0xbdd732262feb6e95ULL);  // splitmix64(42), computed independently
  EXPECT_EQ(stable_hash("flowroll"), 0x6639a78c214b70aeULL);  // FNV-1a 64, computed independently
}

TEST(Dsl, EveryGeneratedProgramFollowsTheGrammar) {
  DslGenerator g(3, kBoth);
  std::map<std::string, int> verbs;
  for (int i = 0; i < 20000; ++i) {
    auto e = g.next();
    ASSERT_EQ(check_program(e.program), "") << e.program;
    verbs[e.program.substr(0, 8)]++;
    std::smatch m;
    for (std::string rest = e.program; std::regex_search(rest, m, std::regex("[0-9]+")); rest = m.suffix())
      EXPECT_NE(e.request.find(m.str()), std::string::npos) << "number of the program not in the request: " << e.request;
  }
  EXPECT_GT(verbs["flowroll"], 9000);
  EXPECT_GT(verbs["dimmatch"], 9000);
}

TEST(Dsl, DroppedRowsBecomeTheNegatedKeep) {
  // Spec table: phrase -> operator; "drop rows where f P n" means "keep f not(P) n".
  const std::map<std::string, std::string> phrase = {
      {"is at least", ">="}, {"is no less than", ">="}, {">=", ">="},   {"exceeds", ">"},   {"is above", ">"},
      {"is more than", ">"}, {"is below", "<"},         {"is under", "<"}, {"is less than", "<"}, {"is at most", "<="},
      {"is no more than", "<="}, {"<=", "<="},          {"equals", "=="}, {"is exactly", "=="}, {"==", "=="},
      {"is not", "!="},      {"differs from", "!="},    {"!=", "!="}};
  const std::map<std::string, std::string> negate = {{">=", "<"}, {">", "<="}, {"<", ">="},
                                                     {"<=", ">"}, {"==", "!="}, {"!=", "=="}};
  DslGenerator g(11, {DslTask::flowroll});
  int checked = 0;
  const std::regex drop("drop rows where ([a-z]+) (.+?) ([0-9]+)(,|$)");
  for (int i = 0; i < 5000; ++i) {
    auto e = g.next();
    for (std::sregex_iterator it(e.request.begin(), e.request.end(), drop), end; it != end; ++it) {
      const auto& m = *it;
      ASSERT_TRUE(phrase.count(m[2])) << m[2];
      std::string expected = "keep " + m[1].str() + " " + negate.at(phrase.at(m[2])) + " " + m[3].str();
      EXPECT_NE(e.program.find(expected), std::string::npos) << e.request << " -> " << e.program;
      ++checked;
    }
  }
  EXPECT_GT(checked, 300);
}

TEST(Dsl, SplitsShareNoRequestAndNoProgram) {
  auto split = make_dsl_split(5, kBoth, 5000, 300);
  ASSERT_EQ(split.train.size(), 5000u);
  ASSERT_EQ(split.validation.size(), 300u);
  std::set<std::string> train_requests, train_programs;
  for (const auto& e : split.train) {
    EXPECT_TRUE(train_requests.insert(e.request).second) << "repeated request " << e.request;
    train_programs.insert(e.program);
  }
  for (const auto& e : split.validation) {
    EXPECT_FALSE(train_requests.count(e.request)) << e.request;
    EXPECT_FALSE(train_programs.count(e.program)) << e.program;
  }
}

TEST(Dsl, CheckerAcceptsTheGrammar) {
  for (const char* ok : {"flowroll a.csv", "flowroll orders.json | keep qty >= 5 | sort price desc | take 3",
                         "flowroll x.log | group region sum price | roll 7 mean temp | rename a b",
                         "dimmatch b t c -> b c t", "dimmatch b (h d) t -> b h t d where h=8",
                         "dimmatch b c y x -> b c (y x)", "dimmatch b t c -> b c reduce mean",
                         "dimmatch b c -> b t c where t=4"}) {
    EXPECT_EQ(check_program(ok), "") << ok;
  }
}

TEST(Dsl, CheckerRejectsWithReason) {
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"select * from t", "a program starts with 'flowroll ' or 'dimmatch '"},
      {"flowroll orders.xls", "flowroll: source 'orders.xls' is not NAME.csv, NAME.json or NAME.log"},
      {"flowroll a.csv | keep qty => 5", "flowroll: stage 1 'keep qty => 5': expected 'keep FIELD OP NUMBER' with OP one of >= > < <= == !="},
      {"flowroll a.csv | take 0", "flowroll: stage 1 'take 0': expected 'take COUNT' with COUNT >= 1"},
      {"flowroll a.csv | group a sum a", "flowroll: stage 1 'group a sum a': expected 'group KEY sum FIELD' with two different fields"},
      {"flowroll a.csv | roll 1 mean x", "flowroll: stage 1 'roll 1 mean x': expected 'roll WINDOW mean FIELD' with WINDOW >= 2"},
      {"flowroll a.csv | explode x", "flowroll: stage 1 'explode x': unknown stage 'explode' (keep, sort, take, group, roll, rename)"},
      {"flowroll a.csv | take 05", "flowroll: stage 1 'take 05': expected 'take COUNT' with COUNT >= 1"},
      {"dimmatch b t -> b t t", "dimmatch: axis 't' repeats on the right"},
      {"dimmatch b t c -> b c", "dimmatch: axes vanish on the right without 'reduce'"},
      {"dimmatch b t -> b t reduce sum", "dimmatch: 'reduce' given but no axis is reduced"},
      {"dimmatch b t -> b t q", "dimmatch: new axis 'q' on the right needs a size in 'where'"},
      {"dimmatch b t -> t b where b=2", "dimmatch: 'b' is bound but is a whole axis on the left"},
      {"dimmatch b (h d -> b h d", "dimmatch: left side: unclosed '('"},
      {"dimmatch b t c", "dimmatch: expected 'LEFT -> RIGHT'"},
      {"dimmatch b t -> b t reduce median", "dimmatch: reducer 'median' is not mean, sum or max"},
      {"dimmatch bt -> bt", "dimmatch: left side: axes must be single letters separated by spaces"},
  };
  for (const auto& [program, reason] : bad) EXPECT_EQ(check_program(program), reason) << program;
}

}  // namespace
}  // namespace scaletrain::data
